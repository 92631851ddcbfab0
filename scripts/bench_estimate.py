"""Wall time of `quantlab estimate`'s computation for the full Qwen3.6-27B (target: < 2 s).

Timed: resolving the shipped config, instantiating it on the meta device (vision tower
included) and grouping its tensors by role, then every scheme in the table × 5 context lengths
(weights per component, KV cache, DeltaNet state, activations, overheads), plus the longest
context that fits 24, 32, 48 and 80 GB for each scheme (a binary search each).
Not timed: importing Python, torch and transformers (reported separately); printing and
writing files. The first run is "cold": it includes transformers' lazy import of the qwen3_5
modeling module. Usage: python scripts/bench_estimate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from quantlab.estimate.estimator import EstimateRequest, estimate
    from quantlab.estimate.model import read_estimation_model
    from quantlab.estimate.schemes import parse_schemes
    from quantlab.estimate.claims import check_claims

    imports = time.perf_counter() - start
    request = EstimateRequest(
        schemes=parse_schemes("all"),
        contexts=(4096, 32768, 65536, 131072, 262144),
        gpu_gib=(24.0, 32.0, 48.0, 80.0),
    )
    print(f"imports (not counted): {imports:.2f} s")
    print(f"work: {len(request.schemes)} schemes × {len(request.contexts)} contexts, max context for {len(request.gpu_gib)} GPU sizes")
    timings = []
    for run in range(args.repeats):
        start = time.perf_counter()
        model = read_estimation_model("qwen3.6-27b")
        loaded = time.perf_counter()
        result = estimate(model, request)
        done = time.perf_counter()
        timings.append(done - start)
        label = "cold" if run == 0 else "warm"
        print(f"run {run + 1} ({label}): {done - start:.3f} s  (config + meta instantiation {loaded - start:.3f} s, "
              f"estimate {done - loaded:.3f} s)")
    start = time.perf_counter()
    claims = check_claims(model, read_estimation_model("qwen3.5-397b-a17b"), [])
    print(f"article claims incl. the 397B config (not in the target): {time.perf_counter() - start:.3f} s, {len(claims)} rows")
    best, worst = min(timings), max(timings)
    verdict = "meets" if worst < 2.0 else "misses"
    print(f"estimate of Qwen3.6-27B: best {best:.3f} s, worst {worst:.3f} s: {verdict} the < 2 s target "
          f"({len(result.methods)} methods)")


if __name__ == "__main__":
    main()
