"""How quantlab's CPU work slows down when another process is busy on the machine, and whether that slowdown is
in proportion to the cores taken away.

One run, one machine, the same work each time (the bundled model: a prefill and greedy decode steps, timed
in a fresh process): alone; beside one busy single-threaded process ("another job on one core"); and beside it
again with each remedy. With N cores and one taken, the work cannot run faster than (N-1)/N of its speed
alone: a slowdown much larger than N/(N-1) is oversubscription (OpenMP threads spinning at their barriers
while the thread they wait for is descheduled), not a lack of cores.

    python scripts/bench_contention.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORK = r"""
import json, sys, time, torch
from quantlab.sources import load_model, resolve_config
from quantlab.recipe import ModelSpec
from quantlab.measure import decode, prefill, prompt_ids
spec = ModelSpec(source="bundled", device="cpu")
model = load_model(spec, resolve_config(spec), torch.device("cpu")).model
ids = prompt_ids(2048, 1, 256, 0, torch.device("cpu"))
times = []
with torch.inference_mode():
    for _ in range(1 + int(sys.argv[2])):
        start = time.perf_counter()
        next_ids, cache = prefill(model, ids)
        decode(model, next_ids, cache, int(sys.argv[1]))
        times.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(times[1:])[len(times[1:]) // 2], "threads": torch.get_num_threads()}))
"""
BUSY = "while True: pass"


def run_work(env_extra: dict[str, str], new_tokens: int, repeats: int) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", WORK, str(new_tokens), str(repeats)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cases = [
        ("alone", False, {}),
        ("beside 1 busy process", True, {}),
        ("beside 1 busy process, OMP_NUM_THREADS=cores-1", True, {"OMP_NUM_THREADS": str(max(1, cores - 1))}),
        ("beside 1 busy process, OMP_WAIT_POLICY=PASSIVE", True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ]
    results = {}
    for name, busy, env in cases:
        hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            results[name] = run_work(env, args.new_tokens, args.repeats)
        finally:
            if hog:
                hog.kill()
                hog.wait()
    alone = results["alone"]["seconds"]
    print(f"{cores} cores; work: bundled model, prefill 256 + {args.new_tokens} decode steps, median of {args.repeats}")
    for name, r in results.items():
        print(f"  {name:<62} {r['seconds']:7.2f} s  ({r['threads']} threads)  slowdown {r['seconds'] / alone:5.2f}x")
    print(f"  in proportion to the cores taken away would be {cores / max(1, cores - 1):.2f}x")


if __name__ == "__main__":
    main()
