"""What the portable llama.cpp build costs: decode tok/s of the portable build (.llama.cpp/, one CPU backend per x86-64
level, the best chosen at run time) against a -march=native build of the same source (.llama.cpp-native/, `make
llama-cpp-native`), on the same GGUFs, in one run, the two builds interleaved so that drift hits both alike.

    .venv/bin/python scripts/bench_llama_cpp_builds.py [--tokens 32] [--rounds 3] [--full-size build/gguf-full-size]

GGUFs: the bundled model's Q4_K_M (the build's self-check fixture) and, when it is there, the full-size Qwen3.6-27B
Q4_K_M of scripts/bench_gguf_cpu_decode.py (build/gguf-full-size/q4_k_m-real.gguf, 16.5 GB, synthetic weights).
Prints each build's median tok/s and the ratio native / portable; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab import llamacpp  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--portable", type=Path, default=ROOT / ".llama.cpp")
    p.add_argument("--native", type=Path, default=ROOT / ".llama.cpp-native")
    p.add_argument("--full-size", type=Path, default=ROOT / "build" / "gguf-full-size")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per llama-bench repetition")
    p.add_argument("--full-tokens", type=int, default=16, help="decode tokens per repetition, full-size GGUF")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per GGUF, the order swapped each round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    builds = {"portable": llamacpp.locate(args.portable), "native": llamacpp.locate(args.native)}
    ggufs = {"bundled Q4_K_M": builds["portable"].root / "checked" / "gguf" / "bundled-q4_k_m.gguf"}
    full = args.full_size / "q4_k_m-real.gguf"
    if full.is_file():
        ggufs["Qwen3.6-27B Q4_K_M (synthetic, 16.5 GB)"] = full
    else:
        print(f"{full}: not there (make bench-gguf-cpu-decode makes it); the full-size GGUF is left out")
    results = []
    for label, gguf in ggufs.items():
        tokens = args.tokens if "bundled" in label else args.full_tokens
        results.append(compare(label, gguf, builds, tokens, args.rounds, args.threads))
    if args.out:
        cpu = llamacpp.cpu_identity()
        stored = {"label": "CPU, llama-bench decode at depth 0, the portable build against a native one",
                  "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "cpu": cpu["model"], "isa": cpu["isa"], "llama_cpp": builds["portable"].version, "results": results}
        args.out.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")


def compare(label: str, gguf: Path, builds: dict, tokens: int, rounds: int, threads: int) -> dict:
    print(f"\n{label}: {gguf.name}, decode {tokens} tokens × 3 repetitions per llama-bench, {rounds} rounds "
          f"(ABBA), {threads} threads")
    samples: dict[str, list[float]] = {name: [] for name in builds}
    backends = {name: llamacpp.cpu_code(tools.bin) for name, tools in builds.items()}
    for tools in builds.values():  # warm-up: the page cache, each build's first load
        bench(tools, gguf, tokens, threads, repeats=1)
    order = list(builds)
    for _ in range(rounds):  # ABBA: each build goes first as often, so that drift and order effects cancel
        for name in order:
            samples[name] += bench(builds[name], gguf, tokens, threads, repeats=3)
        order.reverse()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        print(f"  {name:9s} {backends[name].split(' (')[0]}: median {medians[name]:.3f} tok/s, "
              f"min {min(values):.3f}, max {max(values):.3f} over {len(values)} samples")
    ratio = medians["native"] / medians["portable"]
    print(f"  native / portable = {ratio:.3f}")
    return {"gguf": label, "file": str(gguf), "tokens": tokens, "threads": threads, "backends": backends,
            "samples_tokens_per_s": samples, "median_tokens_per_s": medians, "native_over_portable": ratio}


def bench(tools, gguf: Path, tokens: int, threads: int, repeats: int) -> list[float]:
    """llama-bench's decode tok/s, one per repetition."""
    command = [str(tools.tool("llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads),
               "-r", str(repeats), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout[done.stdout.find("["):])
    return [float(x) for x in rows[0]["samples_ts"]]


if __name__ == "__main__":
    main()
