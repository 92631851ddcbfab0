"""MTP speculative decoding on this CPU through llama.cpp: decode speed with the MTP head drafting k tokens per step
against no draft, for the bundled model's BF16 and Q4_K_M GGUFs (both with its trained MTP head), as ratios from one
run.

The GGUFs are made first (recipes/bundled-mtp-gguf-{bf16,q4_k_m}.yaml, `quantlab build`'s path, into a temporary
folder). Then, for each build and each prompt (held-out text), the no-draft decode (llama-completion) and the MTP
decodes (llama-speculative-simple, k = 1, 2, 3) take turns, round by round, so that drift and other load hit all
alike. Prints each build's medians, the ratio on/off per k, the acceptance, and the time per draft-verify step
against the time per plain token, which says where the speed-up goes on a model this small.

    python scripts/bench_mtp_speculative.py [--prompts 4] [--context 128] [--new-tokens 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from quantlab.artifact.writer import build_recipe
from quantlab.llamacpp import tools as llamacpp
from quantlab.llamacpp.speculative import decode_with_mtp, decode_without_draft
from quantlab.recipe import load_recipe
from quantlab.sources import resolve
from quantlab.speculative import speculative_prompts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BUILDS = {"BF16": RECIPES / "bundled-mtp-gguf-bf16.yaml", "Q4_K_M": RECIPES / "bundled-mtp-gguf-q4_k_m.yaml"}
DRAFTS = (1, 2, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    tools = llamacpp.locate()
    loaded = {name: load_recipe(path) for name, path in BUILDS.items()}
    tokenizer = resolve(loaded["BF16"].recipe.model).tokenizer(required=True, what="the bench")
    prompts = [text for _, text in speculative_prompts(tokenizer, args.context, args.prompts, seed=0)]
    common = ["-c", str(args.context * 2 + args.new_tokens + 64), "-t", str(args.threads), "--seed", "0"]
    print(f"{tools.version}; {args.threads} thread(s); {len(prompts)} prompt(s) of {args.context} tokens, "
          f"{args.new_tokens} new tokens; {args.rounds} round(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-mtp-") as tmp:
        ggufs = {}
        for name, recipe in loaded.items():
            print(f"building {BUILDS[name].name} ...", flush=True)
            ggufs[name] = build_recipe(recipe, Path(tmp) / name, measure=False, progress=False,
                                       echo=lambda _: None).folder / "model.gguf"
        speeds: dict[tuple[str, int], list[float]] = {}
        counts: dict[tuple[str, int], list[int]] = {}
        for round_ in range(1, args.rounds + 1):
            for name, gguf in ggufs.items():
                for prompt in prompts:
                    off = decode_without_draft(tools, gguf, prompt, args.new_tokens, common)
                    speeds.setdefault((name, 0), []).append(off.tok_s)
                    for k in DRAFTS:
                        on = decode_with_mtp(tools, gguf, prompt, args.new_tokens, k, common)
                        speeds.setdefault((name, k), []).append(on.tok_s)
                        totals = counts.setdefault((name, k), [0, 0, 0])
                        totals[0] += on.drafted
                        totals[1] += on.accepted
                        totals[2] += on.draft_calls
            print(f"round {round_} done", flush=True)
    print()
    print("| GGUF | k | decode tok/s (median) | on / off | acceptance | tokens per step | ms per step (on) "
          "| ms per token (off) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name in ggufs:
        off = statistics.median(speeds[(name, 0)])
        print(f"| {name} | off | {off:,.1f} | 1.00 | — | 1 | — | {1000 / off:.3f} |")
        for k in DRAFTS:
            on = statistics.median(speeds[(name, k)])
            drafted, accepted, calls = counts[(name, k)]
            per_step = 1 + accepted / calls
            print(f"| {name} | {k} | {on:,.1f} | {on / off:.2f} | {accepted / drafted:.1%} | {per_step:.2f} | "
                  f"{1000 * per_step / on:.3f} | {1000 / off:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
