"""Decode tokens/s of the full-size Qwen3.6-27B GGUF Q4_K_M on this machine's CPU, beside the bandwidth roofline
measured on the same machine in the same run.

The GGUF is a real 16.5 GB file: llama-quantize run on the sparse BF16 GGUF of scripts/gguf_full_size.py
(synthetic weights: zeros, the real shapes and types; decode speed depends on bytes read, not values). The roofline
is what one decode step must read (every weight but the embedding table, of which it reads one row; the MTP head is
not loaded), divided by the memory read bandwidth that torch measures here with the same thread count.

    .venv/bin/python scripts/bench_gguf_cpu_decode.py [--work build/gguf-full-size] [--tokens 16]

Needs about 17 GB of disk and as much free RAM for the page cache; the first pass reads the file from disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab import fingerprint, llamacpp  # noqa: E402
from quantlab.gguf_file import read_header  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(ROOT / "build" / "gguf-full-size"))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "measurements"))
    args = p.parse_args()
    tools = llamacpp.locate()
    work = Path(args.work)
    sparse, real = work / "bf16-nomtp.gguf", work / "q4_k_m-real.gguf"
    if not sparse.is_file():
        raise SystemExit(f"{sparse}: not there; run `make gguf-full-size` first")
    start = time.perf_counter()
    if not real.is_file():
        partial = real.with_suffix(".partial")
        llamacpp.run_tool(tools, ["llama-quantize", str(sparse), str(partial), "Q4_K_M", str(args.threads)],
                          "llama-quantize Q4_K_M (full size)")
        partial.rename(real)
    quantize_s = time.perf_counter() - start
    header = read_header(real)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    read_per_token = header.tensor_bytes - embd.nbytes + embd.nbytes // embd.shape[1]
    bandwidth = read_bandwidth(args.threads)
    bench = llama_bench(tools, real, args.tokens, args.threads)
    decode = next(r for r in bench if r.get("n_gen"))
    bound = bandwidth / read_per_token
    result = {
        "label": "CPU, synthetic weights (zeros) of Qwen3.6-27B's real shapes, GGUF Q4_K_M without MTP, llama.cpp "
                 "CPU backend (llama-bench), decode at depth 0",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": fingerprint.cpu_model(), "threads": args.threads, "llama_cpp": tools.version,
        "file_bytes": header.file_bytes, "bytes_read_per_token": read_per_token,
        "read_bandwidth_gb_s": bandwidth / 1e9, "roofline_tokens_per_s": bound,
        "decode_tokens_per_s": decode["avg_ts"], "decode_stddev": decode["stddev_ts"],
        "samples_tokens_per_s": decode.get("samples_ts"), "fraction_of_roofline": decode["avg_ts"] / bound,
        "quantize_seconds": round(quantize_s, 1),
    }
    out = Path(args.out) / "gguf-cpu-decode.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads) → roofline {bound:.3f} tok/s "
          f"({read_per_token / 1e9:.2f} GB per token); llama.cpp decode {decode['avg_ts']:.3f} ± "
          f"{decode['stddev_ts']:.3f} tok/s = {decode['avg_ts'] / bound:.0%} of the roofline; wrote {out}")


def read_bandwidth(threads: int, gib: int = 4, repeats: int = 5) -> float:
    """Bytes/s that torch's sum reads from a 4 GiB float32 tensor (bigger than any cache), the best of 5."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(gib * 2**28, dtype=torch.float32)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.numel() * 4 / (time.perf_counter() - start))
    return best


def llama_bench(tools, model: Path, tokens: int, threads: int) -> list[dict]:
    """One warm-up pass (the page cache fills from disk), then llama-bench's own repeats."""
    command = [str(tools.tool("llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
               "-r", "3", "-o", "json"]
    subprocess.run([*command[:-4], "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout[done.stdout.find("["):])


if __name__ == "__main__":
    main()
