"""Build the bundled model: train a tokenizer and a small qwen3_5 model on stdlib Python source.

Run ``python -m quantlab.bundled.train [--out DIR] [--max-minutes 8] [--seed 0]``.
The build is deterministic for a given seed, machine and library versions: it
trains for a fixed number of steps unless the wall-clock budget runs out first
(``build_info.json`` records which). The output folder is written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

# Sleeping (not spinning) OpenMP workers keep steps fast when other processes share the two
# cores; spinning workers can slow a step down tenfold. libgomp reads this when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

from quantlab.text import corpus
from quantlab.bundled import BUNDLED_MODEL_DIR
from quantlab.bundled.evaluate import perplexity

SPECIAL_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2048
SEQ_LEN = 256
EVAL_SEQS = 64
TEST_EVAL_SEQS = 8
HELDOUT_MAX_CHARS = 200_000
NUM_THREADS = 2
FINISH_RESERVE_S = 30.0
LINEAR_DIM_MULTIPLE = 128
LINEAR_DIM_EXCEPTIONS = ("in_proj_a", "in_proj_b")
MAX_FOLDER_BYTES = 10 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of the training run."""

    steps: int = 400
    batch_size: int = 8
    seq_len: int = SEQ_LEN
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What the training loop did."""

    steps: int
    stopped_by: str
    final_loss: float
    losses: list[float]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(text: str) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer of ``VOCAB_SIZE`` tokens on ``text``."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer so that transformers can save and load it."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: pathlib.Path) -> None:
    """Save ``tokenizer`` to ``out`` with tokenizer_class "PreTrainedTokenizerFast"."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_round_trip(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """Raise if encoding then decoding ``text`` does not give it back exactly."""
    decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    if decoded != text:
        mismatch = next((i for i, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
        raise AssertionError(f"tokenizer round trip is lossy at character {mismatch}")


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Encode ``text`` into a 1-D tensor of token ids, without special tokens."""
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def heldout_token_ids(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Token ids of the heldout slice used for the recorded perplexities."""
    return encode(tokenizer, corpus.stdlib_text("heldout", max_chars=HELDOUT_MAX_CHARS))


# --------------------------------------------------------------------------- model


def make_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3_5TextConfig:
    """A scaled-down Qwen3.6-27B text config: 3 Gated DeltaNet layers, then 1 gated full-attention layer."""
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    return Qwen3_5TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        linear_num_key_heads=2,
        linear_key_head_dim=64,
        linear_num_value_heads=4,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": [6, 5, 5],  # the real [11, 11, 10] scaled to 16 rotary frequencies
            "mrope_interleaved": True,
        },
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
        architectures=["Qwen3_5ForCausalLM"],
    )


def linear_dim_violations(model: torch.nn.Module) -> list[str]:
    """Linear layers with a dimension not a multiple of 128, other than DeltaNet in_proj_a/in_proj_b."""
    violations = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith(LINEAR_DIM_EXCEPTIONS):
            continue
        if module.in_features % LINEAR_DIM_MULTIPLE or module.out_features % LINEAR_DIM_MULTIPLE:
            violations.append(f"{name}: {module.in_features} -> {module.out_features}")
    return violations


def build_model(config: Qwen3_5TextConfig, seed: int) -> Qwen3_5ForCausalLM:
    """Instantiate a freshly initialised fp32 model and check its Linear shapes."""
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(config).float()
    violations = linear_dim_violations(model)
    assert not violations, f"Linear dims must be multiples of {LINEAR_DIM_MULTIPLE}: {violations}"
    assert config.vocab_size % LINEAR_DIM_MULTIPLE == 0, f"vocab size {config.vocab_size}"
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------- training


def training_batches(token_ids: torch.Tensor, recipe: TrainRecipe, seed: int) -> Iterator[torch.Tensor]:
    """Yield batches of non-overlapping windows in a seeded random order, reshuffling every epoch."""
    n_windows = token_ids.numel() // recipe.seq_len
    windows = token_ids[: n_windows * recipe.seq_len].reshape(n_windows, recipe.seq_len)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n_windows, generator=generator)
        for start in range(0, n_windows - recipe.batch_size + 1, recipe.batch_size):
            yield windows[order[start : start + recipe.batch_size]]


def learning_rate(step: int, recipe: TrainRecipe) -> float:
    """Linear warmup to ``recipe.lr``, then cosine decay to ``recipe.min_lr_ratio * recipe.lr``."""
    warmup_steps = max(1, round(recipe.warmup_fraction * recipe.steps))
    if step < warmup_steps:
        return recipe.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, recipe.steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, recipe: TrainRecipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or DeltaNet gates)."""
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    undecayed = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decayed, "weight_decay": recipe.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)


def train(
    model: torch.nn.Module, token_ids: torch.Tensor, recipe: TrainRecipe, seed: int, deadline: float
) -> TrainResult:
    """Train for ``recipe.steps`` steps or until ``time.monotonic()`` passes ``deadline``."""
    optimizer = make_optimizer(model, recipe)
    batches = training_batches(token_ids, recipe, seed)
    model.train()
    losses: list[float] = []
    stopped_by = "steps"
    progress = tqdm(range(recipe.steps), desc="training", unit="step", file=sys.stderr, mininterval=1.0)
    for step in progress:
        if time.monotonic() > deadline:
            stopped_by = "time"
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    tail = losses[-10:]
    return TrainResult(len(losses), stopped_by, sum(tail) / max(1, len(tail)), losses)


def bf16_perplexity(model: torch.nn.Module, token_ids: torch.Tensor, max_seqs: int) -> float:
    """Perplexity of a bfloat16 copy of ``model``, as the saved weights will give."""
    return perplexity(copy.deepcopy(model).to(torch.bfloat16), token_ids, SEQ_LEN, max_seqs)


# --------------------------------------------------------------------------- output


@contextlib.contextmanager
def atomic_directory(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        yield staging
        make_world_readable(staging)
        retired = staging.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_world_readable(folder: pathlib.Path) -> None:
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def save_model(model: Qwen3_5ForCausalLM, out: pathlib.Path) -> None:
    """Save the bfloat16 weights, config and a greedy generation config."""
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    config = model.config
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m quantlab.bundled.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=BUNDLED_MODEL_DIR, help="output model folder")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="wall-clock budget of the whole build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainRecipe.steps, help="training steps (fixed budget)")
    parser.add_argument("--batch-size", type=int, default=TrainRecipe.batch_size)
    parser.add_argument("--lr", type=float, default=TrainRecipe.lr, help="peak learning rate")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return args


def log(message: str) -> None:
    print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """The trained tokenizer and the token streams it produced."""

    tokenizer: PreTrainedTokenizerFast
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor


def prepare_tokens() -> Tokens:
    """Train the tokenizer on the 'train' split, check it is lossless, and encode train and heldout text."""
    train_text = corpus.stdlib_text("train")
    tokenizer = wrap_tokenizer(train_tokenizer(train_text))
    heldout_text = corpus.stdlib_text("heldout", max_chars=HELDOUT_MAX_CHARS)
    check_round_trip(tokenizer, heldout_text)
    return Tokens(tokenizer, encode(tokenizer, train_text), encode(tokenizer, heldout_text))


def build_record(
    args: argparse.Namespace,
    recipe: TrainRecipe,
    result: TrainResult,
    perplexities: dict[str, float],
    seconds: dict[str, float],
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
) -> dict:
    """The contents of build_info.json."""
    return {
        "seed": args.seed,
        "steps": result.steps,
        "steps_planned": recipe.steps,
        "stopped_by": result.stopped_by,
        "recipe": dataclasses.asdict(recipe),
        "seq_len": recipe.seq_len,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "train_tokens_seen": result.steps * recipe.batch_size * recipe.seq_len,
        "train_seconds": round(seconds["train"], 1),
        "wall_seconds": round(seconds["wall"], 1),
        "process_cpu_seconds": round(time.process_time(), 1),
        "max_minutes": args.max_minutes,
        "final_train_loss": round(result.final_loss, 4),
        "final_train_loss_note": "mean of the last 10 steps",
        "heldout_eval": {"seq_len": SEQ_LEN, "max_chars": HELDOUT_MAX_CHARS, "dtype": "bfloat16"},
        "heldout_perplexity_before": perplexities["before"],
        "heldout_perplexity_after": perplexities["after"],
        "heldout_eval_seqs": EVAL_SEQS,
        "heldout_perplexity_after_test_slice": perplexities["after_test_slice"],
        "heldout_test_slice_seqs": TEST_EVAL_SEQS,
        "corpus": {split: corpus.describe(split) for split in ("train", "heldout")},
        "tokenizer_vocab_size": len(tokenizer),
        "parameters": parameter_count(model),
        "num_threads": NUM_THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "command": shlex.join(["python", "-m", "quantlab.bundled.train", *args.argv]),
    }


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(NUM_THREADS)
    recipe = TrainRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    deadline = started + args.max_minutes * 60.0 - FINISH_RESERVE_S

    log("training tokenizer on the stdlib 'train' split ...")
    tokens = prepare_tokens()
    log(f"  vocab {len(tokens.tokenizer)}, train tokens {tokens.train_ids.numel():,}, "
        f"heldout tokens {tokens.heldout_ids.numel():,}")

    model = build_model(make_config(tokens.tokenizer), args.seed)
    log(f"model: {parameter_count(model):,} parameters")
    perplexities = {"before": bf16_perplexity(model, tokens.heldout_ids, EVAL_SEQS)}
    log(f"heldout perplexity before training: {perplexities['before']:.2f}")

    train_started = time.monotonic()
    result = train(model, tokens.train_ids, recipe, args.seed, deadline)
    seconds = {"train": time.monotonic() - train_started}
    log(f"trained {result.steps} steps ({result.stopped_by}) in {seconds['train']:.0f}s, loss {result.final_loss:.3f}")

    model.to(torch.bfloat16)
    perplexities["after"] = perplexity(model, tokens.heldout_ids, SEQ_LEN, EVAL_SEQS)
    perplexities["after_test_slice"] = perplexity(model, tokens.heldout_ids, SEQ_LEN, TEST_EVAL_SEQS)
    log(f"heldout perplexity after training (bf16): {perplexities['after']:.2f}")

    with atomic_directory(args.out) as staging:
        save_model(model, staging)
        save_tokenizer(tokens.tokenizer, staging)
        seconds["wall"] = time.monotonic() - started
        record = build_record(args, recipe, result, perplexities, seconds, model, tokens.tokenizer)
        write_json(staging / "build_info.json", record)
        size = folder_bytes(staging)
        assert size <= MAX_FOLDER_BYTES, f"model folder is {size} bytes, over {MAX_FOLDER_BYTES}"
    log(f"wrote {args.out} ({size / 1e6:.2f} MB) in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
