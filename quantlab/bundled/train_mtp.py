"""Train the bundled model's MTP head (quantlab/bundled/mtp.py) with the main model frozen.

Run ``python -m quantlab.bundled.train_mtp [--out DIR] [--steps 800] [--seed 0]``.
The head is distilled from the main model: its row for position t is trained towards the main model's own
distribution for token t+2 (given the true token t+1), because speculative decoding accepts a drafted token when
it is what the main model would pick, not what the corpus says. Deterministic for a seed, machine and library
versions; the folder is written atomically, with ``mtp_info.json`` saying what the head reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as quantlab.bundled.train: sleeping OpenMP workers

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from quantlab.bundled import BUNDLED_MODEL_DIR  # noqa: E402
from quantlab.bundled.evaluate import token_windows  # noqa: E402
from quantlab.bundled.mtp import MTP_DIR, MTP_FILE, MtpHead, head_state, mtp_logits  # noqa: E402
from quantlab.bundled.train import (  # noqa: E402
    EVAL_SEQS, NUM_THREADS, SEQ_LEN, TrainRecipe, atomic_directory, encode, heldout_token_ids, learning_rate,
    make_optimizer, training_batches, write_json,
)
from quantlab.text import corpus  # noqa: E402

RECIPE = TrainRecipe(steps=800, batch_size=8, seq_len=SEQ_LEN, lr=2e-3, weight_decay=0.0)


def distill_loss(main: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's row t against the main model's distribution at t+1 (both predict token t+2)."""
    target = F.softmax(main[:, 1:].float(), dim=-1)
    return -(target * F.log_softmax(drafted.float(), dim=-1)).sum(-1).mean()


@torch.no_grad()
def agreement(model, head: MtpHead, token_ids: torch.Tensor, max_seqs: int) -> dict[str, float]:
    """On heldout windows: how often the head's first choice is the main model's (the first drafted token's
    acceptance under greedy verification, teacher-forced), and the head's perplexity on the true token t+2."""
    windows = token_windows(token_ids, SEQ_LEN, max_seqs)
    agree = total = 0
    nll = 0.0
    for batch in windows.split(8):
        main, drafted = mtp_logits(model, head, batch)
        agree += (drafted.argmax(-1) == main[:, 1:].argmax(-1)).sum().item()
        total += drafted.shape[0] * drafted.shape[1]
        nll += F.cross_entropy(drafted[:, :-1].reshape(-1, drafted.shape[-1]).float(),
                               batch[:, 2:].reshape(-1), reduction="sum").item()
    return {"top1_agreement_with_main": round(agree / total, 4),
            "perplexity_t_plus_2": round(float(torch.tensor(nll / (total - windows.shape[0])).exp()), 3)}


def train(model, head: MtpHead, token_ids: torch.Tensor, recipe: TrainRecipe, seed: int) -> list[float]:
    optimizer = make_optimizer(head, recipe)
    batches = training_batches(token_ids, recipe, seed)
    losses: list[float] = []
    progress = tqdm(range(recipe.steps), desc="training the MTP head", unit="step", file=sys.stderr, mininterval=1.0)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        main, drafted = mtp_logits(model, head, next(batches))
        loss = distill_loss(main, drafted)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    return losses


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-10:]
    return sum(tail) / max(1, len(tail))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quantlab.bundled.train_mtp", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=MTP_DIR, help="the head's folder (replaced only if "
                        "it holds nothing but a head this script wrote)")
    parser.add_argument("--steps", type=int, default=RECIPE.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


MADE_FILES = {MTP_FILE, "mtp_info.json"}  # what this script writes: the only folder it replaces holds just these


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.out.exists() and not (args.out.is_dir() and {p.name for p in args.out.iterdir()} <= MADE_FILES):
        print(f"error: --out {args.out}: exists and is not a head this script wrote (it would be replaced); "
              "give a new folder", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(NUM_THREADS)
    recipe = dataclasses.replace(RECIPE, steps=args.steps)
    tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    # float32 compute on the shipped bfloat16 weights: the main model the runtimes serve, frozen
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(args.seed)
    head = MtpHead(model.config)
    train_ids = encode(tokenizer, corpus.stdlib_text("train"))
    heldout_ids = heldout_token_ids(tokenizer)
    before = agreement(model, head, heldout_ids, EVAL_SEQS)
    print(f"MTP head: {sum(p.numel() for p in head.parameters()):,} parameters; before training {before}", flush=True)
    train_started = time.monotonic()
    losses = train(model, head, train_ids, recipe, args.seed)
    train_seconds = time.monotonic() - train_started
    head.to(torch.bfloat16).float()  # what is shipped is bfloat16: measure that
    after = agreement(model, head, heldout_ids, EVAL_SEQS)
    print(f"trained {len(losses)} steps in {train_seconds:.0f}s, loss {_tail_mean(losses):.3f}; after {after}",
          flush=True)
    with atomic_directory(args.out) as staging:
        save_file(head_state(head), staging / MTP_FILE, metadata={"format": "pt"})
        write_json(staging / "mtp_info.json", {
            "what": "the bundled model's MTP head (Qwen3.5 layout), distilled from the frozen main model",
            "seed": args.seed, "recipe": dataclasses.asdict(recipe), "steps": len(losses),
            "final_loss": round(_tail_mean(losses), 4), "final_loss_note": "mean of the last 10 steps",
            "parameters": sum(p.numel() for p in head.parameters()),
            "heldout": {"windows": EVAL_SEQS, "seq_len": SEQ_LEN, "before": before, "after_bf16": after},
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.monotonic() - started, 1),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "command": shlex.join(["python", "-m", "quantlab.bundled.train_mtp", *args.argv]),
        })
    print(f"wrote {args.out}: {json.dumps(after)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
