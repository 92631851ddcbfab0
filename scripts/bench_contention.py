"""How quantlab's CPU work slows down when another process is busy on the machine, and whether that slowdown is
in proportion to the cores taken away.

One run, one machine, the same work each time (the bundled model: a prefill and greedy decode steps, timed
in a fresh process): alone; beside one busy single-threaded process ("another job on one core"); and beside it
again with each remedy. With N cores and one taken, the work cannot run faster than (N-1)/N of its speed
alone: a slowdown much larger than N/(N-1) is oversubscription (OpenMP threads spinning at their barriers
while the thread they wait for is descheduled), not a lack of cores.

    python scripts/bench_contention.py [--work decode|awq] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DECODE = r"""
import json, sys, time, torch
from quantlab.sources import resolve
from quantlab.recipe import ModelSpec
from quantlab.measure import prompt_ids
from quantlab.runtimes.transformers import decode, load_model, prefill
if sys.argv[3] == "fit":
    from quantlab.threads import fit_threads
    fit_threads()
spec = ModelSpec(source="bundled", device="cpu")
model = load_model(resolve(spec), torch.device("cpu")).model
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
AWQ = r"""
import json, sys, tempfile, time, torch
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer
from quantlab.bundled import bundled_model_dir
from quantlab.text.calibration import calibration_samples
from quantlab.quantize.awq.engine import AwqJob
from quantlab.quantize.awq.native import QuantlabEngine
from quantlab.methods.awq import AwqConfig, engine_params
if sys.argv[3] == "fit":
    from quantlab.threads import fit_threads
    fit_threads()
folder = bundled_model_dir()
q = AwqConfig(method="awq", calibration={"samples": 16, "seq_len": 256}, batch_size=8)
cal = calibration_samples(q.calibration, AutoTokenizer.from_pretrained(folder))
times = []
for _ in range(int(sys.argv[2])):
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = AutoConfig.from_pretrained(folder)
        QuantlabEngine().quantize(AwqJob(folder, config, Path(tmp), engine_params(q, config.architectures[0]), cal.input_ids,
                                         torch.device("cpu"), torch.bfloat16, 10**9, progress=False))
        times.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "threads": torch.get_num_threads()}))
"""
WORKS = {"decode": DECODE, "awq": AWQ}
BUSY = "while True: pass"


def run_work(work: str, env_extra: dict[str, str], new_tokens: int, repeats: int, fit: bool) -> dict:
    env = {**os.environ, **env_extra}
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):  # each case sets its own, or leaves the default
        if name not in env_extra:
            env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", WORKS[work], str(new_tokens), str(repeats), "fit" if fit else "-"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", choices=sorted(WORKS), default="decode",
                        help="decode: prefill + greedy steps; awq: quantizing the bundled model (16 x 256 tokens)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    cases = [  # (name, beside a busy process, environment, quantlab's thread fit)
        ("alone", False, {}, False),
        ("alone, quantlab's thread fit (quantlab.threads)", False, {}, True),
        ("alone, OMP_WAIT_POLICY=PASSIVE", False, {"OMP_WAIT_POLICY": "PASSIVE"}, False),
        ("beside 1 busy process, torch's default threads", True, {}, False),
        ("beside 1 busy process, quantlab's thread fit", True, {}, True),
        ("beside 1 busy process, OMP_WAIT_POLICY=PASSIVE", True, {"OMP_WAIT_POLICY": "PASSIVE"}, False),
    ]
    results = {}
    for name, busy, env, fit in cases:
        hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            results[name] = run_work(args.work, env, args.new_tokens, args.repeats, fit)
        finally:
            if hog:
                hog.kill()
                hog.wait()
    alone = results["alone"]["seconds"]
    what = (f"prefill 256 + {args.new_tokens} decode steps" if args.work == "decode"
            else "AWQ-quantizing it, 16 x 256 calibration tokens")
    print(f"{cores} cores; work: bundled model, {what}, median of {args.repeats}")
    for name, r in results.items():
        print(f"  {name:<62} {r['seconds']:7.2f} s  ({r['threads']} threads)  slowdown {r['seconds'] / alone:5.2f}x")
    print(f"  in proportion to the cores taken away would be {cores / max(1, cores - 1):.2f}x")


if __name__ == "__main__":
    main()
