"""Serving throughput through vLLM: quantlab's AWQ build of the bundled model against its BF16 model, at one
concurrency (16 by default), as a ratio from one run.

The AWQ build is made first (recipes/bundled-awq.yaml, `quantlab build`'s path, into a temporary folder). Then the
two servers take turns, round by round (BF16, AWQ, BF16, AWQ, ...), each started fresh with the same settings and
sent the same seeded requests, so that drift and other load hit both alike. Prints each round, the medians of
output tok/s and requests/s, and AWQ / BF16.

    python scripts/bench_vllm_serving.py [--concurrency 16] [--requests 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from quantlab.artifact.writer import build_recipe
from quantlab.bundled import bundled_model_dir
from quantlab.recipe import load_recipe
from quantlab.vllm_server.client import VllmClient
from quantlab.vllm_server.load import LoadSettings, describe_level, run_level
from quantlab.vllm_server.server import ServerConfig, VllmServer, installed_version

AWQ_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bundled-awq.yaml"


def serve_once(folder: Path, settings: LoadSettings, kv_gib: float):
    config = ServerConfig(model=str(folder), max_model_len=settings.input_tokens + settings.output_tokens + 1,
                          max_num_seqs=settings.concurrency, kv_cache_gib=kv_gib, prefix_caching=False)
    with VllmServer(config) as server:
        client = VllmClient(server.url, str(folder))
        client.greedy([1] * settings.input_tokens, 2)  # warm-up, as vllm bench serve sends a test request first
        return run_level(client, settings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-gib", type=float, default=1.0)
    args = parser.parse_args()
    bf16 = bundled_model_dir()
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-vllm-") as tmp:
        print(f"building {AWQ_RECIPE.name} into {tmp} ...", flush=True)
        awq = build_recipe(load_recipe(AWQ_RECIPE), Path(tmp) / "awq", measure=False, progress=False,
                           echo=lambda _: None).folder
        settings = LoadSettings(args.concurrency, args.requests, args.input_tokens, args.output_tokens,
                                vocab_size=2048, seed=0)
        results: dict[str, list] = {"BF16": [], "AWQ": []}
        for round_ in range(1, args.rounds + 1):
            for name, folder in (("BF16", bf16), ("AWQ", awq)):
                level = serve_once(folder, settings, args.kv_gib)
                results[name].append(level)
                print(f"round {round_} {name:>4}: {describe_level(level)}", flush=True)
    return report(results, args, installed_version())


def report(results: dict[str, list], args, version: str) -> int:
    failed = sum(level.failed for levels in results.values() for level in levels)
    out = {name: statistics.median(level.output_throughput for level in levels) for name, levels in results.items()}
    req = {name: statistics.median(level.request_throughput for level in levels) for name, levels in results.items()}
    print(f"\n{version}, bundled model on this machine's CPU, concurrency {args.concurrency}, {args.requests} requests "
          f"of {args.input_tokens} + {args.output_tokens} tokens, {args.rounds} round(s) each, medians:")
    print("| Build | Output tok/s | Requests/s |\n|---|--:|--:|")
    for name in results:
        print(f"| {name} | {out[name]:,.1f} | {req[name]:,.2f} |")
    print(f"\nAWQ / BF16 output throughput: {out['AWQ'] / out['BF16']:.3f}")
    if failed:
        print(f"{failed} request(s) failed: the ratio counts completed requests only")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
