"""Harness overhead: quantlab's decode tokens/s vs a bare KV-cache loop, same model, same run.

The two are interleaved round by round so that drift (thermal, other load) hits both alike.
Prints the medians and their ratio; the target is quantlab / bare >= 0.97.

    python scripts/bench_overhead.py [--recipe recipes/bundled-bf16.yaml] [--rounds 15] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time

import torch
from transformers.utils import logging as hf_logging

from quantlab.measure import PointSettings, measure_point
from quantlab.plan import make_plan
from quantlab.recipe import load_recipe
from quantlab.runtimes.transformers import TransformersRuntime, load_model

TARGET = 0.97


def bare_decode_tokens_per_s(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """The simplest correct loop: prefill, then greedy steps with the cache, timed with a sync at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/bundled-bf16.yaml")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()

    plan = make_plan(load_recipe(args.recipe))
    model = load_model(plan.source, plan.device).model
    runtime = TransformersRuntime()
    measure = plan.recipe.measure
    settings = PointSettings(args.context, 1, args.new_tokens, warmup=0, repeats=1, sample_interval_s=measure.memory_sample_ms / 1000)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, args.context)).to(plan.device)

    bare_decode_tokens_per_s(model, ids, args.new_tokens, plan.device)  # warm-up for both
    measure_point(runtime, model, settings, plan.device, progress=False)
    harness, bare = [], []
    for _ in range(args.rounds):
        harness.append(measure_point(runtime, model, settings, plan.device, progress=False).decode_tokens_per_s.median)
        bare.append(bare_decode_tokens_per_s(model, ids, args.new_tokens, plan.device))

    h, b = statistics.median(harness), statistics.median(bare)
    ratio = h / b
    print(f"model {plan.source.name} on {plan.device} ({torch.get_num_threads()} threads), context {args.context}, "
          f"{args.new_tokens} new tokens, {args.rounds} interleaved rounds")
    print(f"  quantlab decode : median {h:8.2f} tok/s  (min {min(harness):.2f}, max {max(harness):.2f})")
    print(f"  bare loop decode: median {b:8.2f} tok/s  (min {min(bare):.2f}, max {max(bare):.2f})")
    print(f"  ratio quantlab / bare = {ratio:.3f}  (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
