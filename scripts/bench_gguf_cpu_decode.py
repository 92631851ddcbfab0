"""Decode tokens/s of the full-size Qwen3.6-27B GGUF Q4_K_M on this machine's CPU, and its share of the bandwidth
roofline only where the model stayed in memory and the machine held still while both were measured.

The GGUF is a real 16.5 GB file: llama-quantize run on the sparse BF16 GGUF of scripts/gguf_full_size.py
(synthetic weights: zeros, the real shapes and types; decode speed depends on bytes read, not values). The roofline
is what one decode step must read (every weight but the embedding table, of which it reads one row; the MTP head is
not loaded), divided by the read bandwidth measured here.

Where the decode reads its weights from: llama-bench maps the file (-lm mmap), and on a CPU with AVX2 llama.cpp
copies every Q4_K tensor into its own (anonymous) memory at load, repacked for its kernels (CPU_REPACK, 10.8 GiB of
this model); the decode reads those from there and only the rest (5.2 GB with the embedding table: Q6_K tensors,
norms, ...) from the page cache. The file's pages of the repacked tensors are never read again, and on a 24 GB
machine the kernel drops them to make room for the copies: the page cache falls by GBs during any run, which is no
harm. What is harm is a page the decode reads having to come back from disk: the embedding rows of llama-bench's
random tokens, and at a slow decode (a busy machine) any weight, since a page touched only every few seconds looks
cold to reclaim (these VMs also run DAMON's proactive pageout, which drops pages idle for a minute). So the bench
pins exactly the pages the decode reads from the file (mlock from this process, `quantlab.residency.pinned`) while
it is timed; llama.cpp names each tensor it repacks in its verbose log, and the warm-up run reads that list
(`quantlab.residency.read_through_mapping`; every tensor counts if the log does not account for the repack buffer).
Where mlock is refused (no CAP_IPC_LOCK) nothing is pinned and the checks below decide.

How the bandwidth is read, and why: over the model file's own pages, while they are all in the page cache, through
a shared read-only mapping on 4 KiB pages, with the decode's thread count (torch's sum over the mapping,
`quantlab.residency.read_bandwidth`), 5 passes just before and 5 just after the timed decode; the roofline takes
their median. That buffer is exactly as large as the model, it is DRAM on the page size of llama.cpp's copies, and
it costs no RAM beside the cached model: a separate anonymous buffer as large as the model (15.4 GiB) cannot sit
beside the 15.4 GiB cached model in 24 GB, and measuring first and freeing before warming the model reads the file
back from disk and times the two minutes apart, under whatever else the machine was doing then. (4 KiB pages because
the kernel may map a cached file with 2 MiB pages or not, depending on how it came into the cache, and on a 2-core
VM that alone gave 33 GB/s against 28; the 5.2 GB llama.cpp reads through its own mapping may get 2 MiB pages, so for
that part the bound is a little low.) Passes before and after the decode that disagree show that the conditions
changed in between.

What is checked (`quantlab.residency`, thresholds and their reasons there): the pages the decode reads from the file
are in the page cache (mincore) when the first timed sample starts (llama-bench --progress says when) and when the
run ends; the major page faults of llama-bench from that moment to its exit (/proc/<pid>/stat then, os.wait4's
rusage at the end: page-cache misses, and swap-ins of its own memory where there is swap) and of the timed bandwidth
passes; how much the bandwidth passes and the decode samples vary, and whether the bandwidth moved between before
and after. When any check fails the script prints why on one line and gives no share: the JSON keeps every measured
number, the reasons under `problems`, and `fraction_of_roofline: null`, and the script exits with status 2.

    .venv/bin/python scripts/bench_gguf_cpu_decode.py [--work build/gguf-full-size] [--tokens 16] [--out DIR]

Needs about 17 GB of disk and as much free RAM for the page cache; the first pass reads the file from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab import fingerprint, llamacpp, residency  # noqa: E402
from quantlab.llamacpp.gguf_file import read_header  # noqa: E402

LABEL = ("CPU, synthetic weights (zeros) of Qwen3.6-27B's real shapes, GGUF Q4_K_M without MTP, llama.cpp CPU "
         "backend (llama-bench), decode at depth 0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT / "build" / "gguf-full-size"))
    p.add_argument("--tokens", type=int, default=16, help="tokens per decode sample")
    p.add_argument("--repeats", type=int, default=5, help="decode samples (llama-bench -r)")
    p.add_argument("--passes", type=int, default=5, help="bandwidth passes before, and again after, the decode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "measurements"))
    args = p.parse_args()
    tools = llamacpp.locate()
    model, quantize_s = quantized_model(tools, Path(args.work), args.threads)
    result = measure(tools, model, args)
    result["quantize_seconds"] = round(quantize_s, 1)
    share, problems = residency.roofline_share(result)
    result.update(problems=problems, fraction_of_roofline=share)
    out = Path(args.out) / "gguf-cpu-decode.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(summary(result))
    print(f"= {share:.0%} of the roofline (every check passed)" if share is not None
          else "no roofline share: " + "; ".join(problems))
    print(f"wrote {out}")
    if share is None:
        sys.exit(2)


def quantized_model(tools, work: Path, threads: int) -> tuple[Path, float]:
    sparse, real = work / "bf16-nomtp.gguf", work / "q4_k_m-real.gguf"
    if not sparse.is_file():
        raise SystemExit(f"{sparse}: not there; run `make gguf-full-size` first")
    start = time.perf_counter()
    if not real.is_file():
        partial = real.with_suffix(".partial")
        llamacpp.run_tool(tools, ["llama-quantize", str(sparse), str(partial), "Q4_K_M", str(threads)],
                          "llama-quantize Q4_K_M (full size)")
        partial.rename(real)
    return real, time.perf_counter() - start


def measure(tools, model: Path, args) -> dict:
    """Warm up, bandwidth passes, the timed decode (the model's pages pinned; residency and faults at its start and
    end), bandwidth passes: in that order."""
    header = read_header(model)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    read_per_token = header.tensor_bytes - embd.nbytes + embd.nbytes // embd.shape[1]
    with tempfile.TemporaryDirectory() as logs:
        _, warm = llama_bench(tools, model, 1, args.threads, 1, logs, ["--no-warmup", "-v"])  # pages it all in
        ranges, repacked, trusted = residency.read_through_mapping(tensor_ranges(model), warm.stderr)
        bw_before, bw_faults = residency.read_bandwidth(model, args.threads, args.passes)
        file_before, load_before = residency.residency(model), os.getloadavg()[0]
        with residency.pinned(model, ranges) as pinned:
            rows, timed = llama_bench(tools, model, args.tokens, args.threads, args.repeats, logs, ["--progress"],
                                      mark="generation run 1/", on_mark=lambda: residency.residency(model, ranges))
            mapped_end = residency.residency(model, ranges)
        file_after, load_after = residency.residency(model), os.getloadavg()[0]
        bw_after, faults_after = residency.read_bandwidth(model, args.threads, args.passes)
    decode = next(r for r in rows if r.get("n_gen"))
    result = {
        "label": LABEL, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": fingerprint.cpu_model(), "threads": args.threads, "llama_cpp": tools.version,
        "cpu_code": llamacpp.cpu_code(tools.bin),
        "file_bytes": header.file_bytes, "bytes_read_per_token": read_per_token,
        "bandwidth_method": f"torch sum over the model file's own page-cache pages (shared read-only mapping, 4 KiB "
                            f"pages), {args.threads} threads, median of {args.passes} passes before the decode and "
                            f"{args.passes} after",
        "bandwidth_before_gb_s": [b / 1e9 for b in bw_before], "bandwidth_after_gb_s": [b / 1e9 for b in bw_after],
        "decode_tokens_per_s": decode["avg_ts"], "decode_stddev": decode["stddev_ts"],
        "samples_tokens_per_s": decode.get("samples_ts"),
        "checks": {
            "repacked_bytes": repacked, "repack_log_read": trusted, "mapped_read_bytes": sum(n for _, n in ranges),
            "pinned_bytes": pinned, "mapped_resident_start": timed.at_mark.fraction if timed.at_mark else None,
            "mapped_resident_end": mapped_end.fraction,
            "file_resident_before": file_before.fraction, "file_resident_after": file_after.fraction,
            "decode_major_faults": None if timed.major_faults_at_mark is None
            else timed.major_faults - timed.major_faults_at_mark,
            "llama_bench_major_faults": timed.major_faults, "warmup_major_faults": warm.major_faults,
            "bandwidth_major_faults": bw_faults + faults_after,
            "loadavg_1min_before": load_before, "loadavg_1min_after": load_after,
        },
        "thresholds": {"min_resident": residency.MIN_RESIDENT, "max_major_faults": residency.MAX_MAJOR_FAULTS,
                       "max_cv": residency.MAX_CV, "max_drift": residency.MAX_DRIFT},
    }
    result["read_bandwidth_gb_s"] = residency.roofline_bandwidth(result)
    result["roofline_tokens_per_s"] = result["read_bandwidth_gb_s"] * 1e9 / read_per_token
    return result


def tensor_ranges(model: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's (offset, bytes) in the file, from gguf-py's reader."""
    from gguf import GGUFReader

    return {t.name: (int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(model).tensors}


def llama_bench(tools, model: Path, tokens: int, threads: int, repeats: int, logs: str, extra: list[str],
                mark: str | None = None, on_mark=None):
    """llama-bench's rows (its own warm-up decode, then `repeats` timed ones) and its run (major page faults)."""
    command = [str(tools.tool("llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
               "-r", str(repeats), "-lm", "mmap", "-o", "json", *extra]  # mmap: the model lives in the page cache
    done = residency.run_counting_faults(command, logs, mark, on_mark)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.find("["):]), done


def summary(r: dict) -> str:
    c, samples = r["checks"], r["samples_tokens_per_s"] or []
    passes, start, end = r["bandwidth_before_gb_s"] + r["bandwidth_after_gb_s"], c["mapped_resident_start"], \
        c["mapped_resident_end"]
    return (f"llama.cpp decode {r['decode_tokens_per_s']:.3f} ± {r['decode_stddev']:.3f} tok/s ({len(samples)} samples "
            f"of {min(samples, default=0):.3f}-{max(samples, default=0):.3f}); read bandwidth over the model's own "
            f"pages {r['read_bandwidth_gb_s']:.1f} GB/s (median of {len(passes)} passes of {min(passes):.1f}-"
            f"{max(passes):.1f}, {r['threads']} threads) → roofline {r['roofline_tokens_per_s']:.3f} tok/s "
            f"({r['bytes_read_per_token'] / 1e9:.2f} GB per token; llama.cpp repacked {c['repacked_bytes'] / 1e9:.2f} "
            f"GB into its own memory and reads {c['mapped_read_bytes'] / 1e9:.2f} GB of the file through its "
            f"mapping, {c['pinned_bytes'] / 1e9:.2f} GB of that pinned); those pages resident "
            f"{'?' if start is None else f'{start:.1%}'} at the start of the timed decode and {end:.1%} at its end "
            f"(the whole file {c['file_resident_before']:.1%} before, {c['file_resident_after']:.1%} after); major "
            f"faults: timed decode {c['decode_major_faults']}, bandwidth passes {c['bandwidth_major_faults']}, "
            f"llama-bench in all {c['llama_bench_major_faults']}, warm-up {c['warmup_major_faults']}; load average "
            f"{c['loadavg_1min_before']:.1f} → {c['loadavg_1min_after']:.1f}")


if __name__ == "__main__":
    main()
