"""The GGUF GPU check: the full-size synthetic Qwen3.6-27B Q4_K_M through llama.cpp's CUDA build, every layer on
the GPU, at 4k and 32k tokens: llama.cpp's planned buffers per device (llama-fit-params), decode tokens/s at that
depth and prefill tokens/s (llama-bench: -d DEPTH -n 64 -p 512), and nvidia-smi's memory while it runs (NVML,
sampled every 20 ms). Writes measurements/gguf-gpu-check.json and .md, labelled: GPU, synthetic weights (zeros:
the data of the sparse file is a hole) of the real shapes, the llama.cpp build and its flags.

Two halves, because an offline GPU box has no llama.cpp source tree and its build takes long:
  --pack     (here, on the CPU machine) the Q4_K_M GGUF's header (scripts/gguf_full_size.py made the file), and
             the CUDA build's binaries if there is one (scripts/build_llama_cpp_cuda.sh), into .gpu-gguf/
  default    (on the GPU box) rebuild the sparse file from the header, run the three llama.cpp tools, write
             the records; with --bin DIR, any llama.cpp build (--rehearse: the CPU build, -ngl 0, the bundled
             model's GGUF and small contexts, to check the script end to end without a GPU)

    python scripts/gpu_check_gguf.py --pack
    python scripts/gpu_check_gguf.py [--contexts 4096,32768] [--out measurements] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu-gguf"
HEADER = PACK / "qwen3.6-27b-q4_k_m.head.gz"
META = PACK / "qwen3.6-27b-q4_k_m.json"
BINARIES = PACK / "llama-cuda-bin.tar.gz"
LIBS = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libggml-cuda.so")
TOOLS = ("llama-bench", "llama-fit-params")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pack", action="store_true", help="on the CPU machine: pack the header (and a CUDA build)")
    p.add_argument("--source", default=str(ROOT / "build" / "gguf-full-size" / "q4_k_m-mtp.gguf"))
    p.add_argument("--cuda-bin", default=str(ROOT / ".llama-cuda" / "bin"), help="--pack: the CUDA build's bin/")
    p.add_argument("--bin", help="llama.cpp binaries to run (default: .gpu-gguf/bin, else .llama.cpp/build/bin)")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--out", default=str(ROOT / "measurements"))
    p.add_argument("--work", default="/dev/shm" if Path("/dev/shm").is_dir() else "/tmp")
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--rehearse", action="store_true", help="CPU build, -ngl 0, the bundled model's Q4_K_M GGUF")
    args = p.parse_args()
    if args.pack:
        return pack(Path(args.source), Path(args.cuda_bin))
    return check(args)


def pack(source: Path, cuda_bin: Path) -> int:
    if not source.is_file():
        print(f"{source}: not there; run `make gguf-full-size` first", file=sys.stderr)
        return 1
    from quantlab.llamacpp.gguf_file import read_header

    header = read_header(source)
    data_start = header.file_bytes - _padded_data_bytes(source)
    PACK.mkdir(exist_ok=True)
    with source.open("rb") as src, gzip.open(HEADER, "wb", compresslevel=9) as dst:
        dst.write(src.read(data_start))
    META.write_text(json.dumps({"file_bytes": header.file_bytes, "header_bytes": data_start,
                                "parameters_by_type": header.parameters_by_type(), "block_count": header.block_count},
                               indent=2), encoding="utf-8")
    copied = pack_binaries(cuda_bin) if cuda_bin.is_dir() else 0
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    print(f"packed {PACK}: header {data_start:,} B ({HEADER.stat().st_size:,} B gzipped) for a {header.file_bytes:,} B "
          f"file; {copied} CUDA build file(s); {size / 2**20:.1f} MiB in all (the carry limit is 64 MiB with the tree)")
    return 0


def pack_binaries(cuda_bin: Path) -> int:
    """The CUDA build's libraries and tools, stripped (67 → 60 MB for libggml-cuda) and in one .tar.gz (~40 MB)."""
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "bin"
        staged.mkdir()
        for path in sorted(cuda_bin.iterdir()):
            if path.name.startswith(("lib", *TOOLS)) and (path.suffix == ".so" or ".so." in path.name or path.name in TOOLS):
                shutil.copy2(path, staged / path.name, follow_symlinks=False)
                if not path.is_symlink():
                    subprocess.run(["strip", "--strip-unneeded", str(staged / path.name)], check=False)
        with tarfile.open(BINARIES, "w:gz", compresslevel=9) as tar:
            tar.add(staged, arcname="bin")
        return sum(1 for _ in staged.iterdir())


def _padded_data_bytes(path: Path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return path.stat().st_size - min(t.data_offset for t in reader.tensors)


def check(args) -> int:
    deadline = time.monotonic() + args.budget_s
    contexts = [int(c) for c in args.contexts.split(",")]
    bin_dir = Path(args.bin) if args.bin else _unpacked_binaries(Path(args.work))
    env = _env(bin_dir)
    if args.rehearse:
        model, layers = _rehearsal_model(Path(args.work)), 0
        contexts = [256 * (i + 1) for i in range(len(contexts))]  # small: the bundled model, on 2 CPU cores
    else:
        model, layers = _sparse_model(Path(args.work)), 999
    result = {"label": _label(args.rehearse), "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "llama_cpp_bin": str(bin_dir), "version": _run([str(bin_dir / "llama-bench"), "--version"], env, 60)[-400:],
              "cpu_code": _cpu_code(bin_dir), "model": str(model), "gpu_layers": layers, "points": []}
    for context in contexts:
        if time.monotonic() > deadline - 60:
            result["points"].append({"context": context, "status": "skipped: out of time"})
            continue
        plan = _fit_print(bin_dir, env, model, context, layers)
        bench, peak = _bench(bin_dir, env, model, context, layers, max(30.0, deadline - time.monotonic() - 30))
        result["points"].append({"context": context, "planned_mib": plan, "llama_bench": bench,
                                 "nvidia_smi_peak_bytes": peak})
        print(f"context {context:,}: planned MiB (model, context, compute) {plan}; {_speeds(bench)}; nvidia-smi peak "
              + (f"{peak / 2**30:.2f} GiB" if peak else "none (no GPU)"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gguf-gpu-check-rehearsal" if args.rehearse else "gguf-gpu-check"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / name}.json")
    return 0


def _cpu_code(bin_dir: Path) -> str:
    """The CPU backend those binaries load on this host, and llama.cpp's system-info line."""
    from quantlab.llamacpp import cpu_code

    return cpu_code(bin_dir)


def _speeds(bench: list) -> str:
    parts = []
    for row in bench:
        if row.get("n_prompt"):
            parts.append(f"prefill {row['avg_ts']:,.0f} ± {row['stddev_ts']:,.0f} tok/s")
        elif row.get("n_gen"):
            parts.append(f"decode {row['avg_ts']:,.1f} ± {row['stddev_ts']:,.1f} tok/s at depth {row['n_depth']:,}")
    return ", ".join(parts) or "no llama-bench rows"


def _unpacked_binaries(work: Path) -> Path:
    """The packed CUDA build, unpacked into `work`; else the local build (.llama.cpp/build/bin)."""
    import tarfile

    if not BINARIES.is_file():
        return ROOT / ".llama.cpp" / "build" / "bin"
    with tarfile.open(BINARIES) as tar:
        tar.extractall(work / "llama-cuda", filter="data")
    return work / "llama-cuda" / "bin"


def _label(rehearse: bool) -> str:
    if rehearse:
        return "REHEARSAL on the CPU: the bundled model's GGUF, CPU build, no GPU; checks the script, measures nothing"
    return ("GPU, synthetic weights (zeros) of Qwen3.6-27B's real shapes, GGUF Q4_K_M with the MTP head (not "
            "loaded), every layer on the GPU, llama.cpp's CUDA build (GGML_CUDA_NO_VMM: the legacy memory pool)")


def _env(bin_dir: Path) -> dict[str, str]:
    """The box's CUDA runtime libraries come with its torch (nvidia/cu13/lib); libllama from bin_dir."""
    env = dict(os.environ)
    paths = [str(bin_dir)]
    try:
        import nvidia

        paths += [str(Path(p) / "cu13" / "lib") for p in nvidia.__path__]
    except ImportError:
        pass
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*paths, env.get("LD_LIBRARY_PATH")]))
    return env


def _sparse_model(work: Path) -> Path:
    meta = json.loads(META.read_text(encoding="utf-8"))
    path = work / "qwen3.6-27b-q4_k_m-synthetic.gguf"
    with gzip.open(HEADER, "rb") as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(meta["file_bytes"])  # the data: a hole, read as zeros
    return path


def _rehearsal_model(work: Path) -> Path:
    from quantlab import llamacpp
    from quantlab.llamacpp.steps import convert, quantize

    tools = llamacpp.locate()
    bf16, q4 = work / "bundled-bf16.gguf", work / "bundled-q4_k_m.gguf"
    convert(tools, ROOT / "quantlab" / "bundled" / "model", bf16, "bf16", mtp=False)
    quantize(tools, bf16, q4, "Q4_K_M", None)
    return q4


def _fit_print(bin_dir: Path, env, model: Path, context: int, layers: int) -> dict[str, list[int]]:
    """llama.cpp's planned buffers per device: model, context, compute (MiB)."""
    from quantlab.llamacpp.full_size import fit_print_rows

    out = _run([str(bin_dir / "llama-fit-params"), "-m", str(model), "-c", str(context), "-ngl", str(layers),
                "-nr", "--fit-print", "on"], env, 120)
    return fit_print_rows(out)


def _bench(bin_dir: Path, env, model: Path, depth: int, layers: int, timeout: float) -> tuple[list, int | None]:
    sampler = _NvmlPeak()
    sampler.start()
    try:
        out = _run([str(bin_dir / "llama-bench"), "-m", str(model), "-ngl", str(layers), "-p", "512", "-n", "64",
                    "-d", str(depth), "-r", "3", "-o", "json"], env, timeout)
    finally:
        sampler.stop()
    start = out.find("[")
    return (json.loads(out[start:]) if start >= 0 else [{"raw": out[-800:]}]), sampler.peak


def _run(command: list[str], env, timeout: float) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed ({done.returncode}):\n{done.stderr[-1500:]}")
    return done.stdout + ("\n" + done.stderr if "version" in command[-1] else "")


class _NvmlPeak:
    """nvidia-smi's used memory on GPU 0, sampled every 20 ms; None without a GPU (never 0 as a reading)."""

    def __init__(self):
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return
        while not self._stop.is_set():
            used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self.peak = max(self.peak or 0, used)
            time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
