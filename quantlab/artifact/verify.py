"""`quantlab verify BUILD`: the checksums, then a reload with plain transformers, then the greedy
tokens recorded at build time, repeated."""

from __future__ import annotations

from quantlab.artifact.results import VerifyResult
from quantlab.schema.build import is_gguf_build

import re
from pathlib import Path
from typing import Callable

import torch

from quantlab.checksums import check_checksums
from quantlab.schema.build import read_manifest
from quantlab.placement import recover_interrupted_replace
from quantlab.errors import QuantlabError

PROMPT_FALLBACK_TOKENS = 8


def prompt_token_ids(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    """The prompt's token ids; fixed ids when the checkpoint has no tokenizer."""
    if tokenizer is not None:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids:
            return [int(i) for i in ids]
    return [(7 * i + 3) % vocab_size for i in range(PROMPT_FALLBACK_TOKENS)]


@torch.inference_mode()
def greedy_tokens(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int, device) -> list[int]:
    """`new_tokens` greedy tokens from plain `generate` (no sampling, no early stop at EOS)."""
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
    )
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def teacher_forced_agreement(model: torch.nn.Module, prompt_ids: list[int], reference: list[int], device) -> float:
    """The share of `reference`'s tokens that `model` predicts (argmax) when fed the prompt and the reference's
    own earlier tokens: one forward pass, independent of where two free-running generations part ways."""
    ids = torch.tensor([prompt_ids + reference[:-1]], device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt_ids) - 1:]
    predicted = logits.argmax(-1).tolist()
    return sum(p == r for p, r in zip(predicted, reference)) / len(reference)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def verify_build(folder: str | Path, device: str = "cpu", load: bool = True, echo: Callable[[str], None] = print) -> VerifyResult:
    folder = Path(folder)
    recover_interrupted_replace(folder, lambda line: echo(f"note: {line}"))
    if not folder.is_dir():
        raise QuantlabError(f"{folder}: build folder not found")
    if is_gguf_build(folder):
        from quantlab.artifact.gguf_build import verify_gguf

        return verify_gguf(folder, load, device, echo)
    if load:
        torch_device = verify_device(device)
    manifest = read_manifest(folder)
    problems, good = check_checksums(folder)
    for p in problems:
        echo(f"  FAIL {p}")
    echo(f"checksums: {len(good)} file(s) match" + (f", {len(problems)} problem(s)" if problems else ""))
    if problems:
        return VerifyResult(False, tuple(problems), len(good))
    if not load:
        return VerifyResult(True, (), len(good))

    import transformers
    from quantlab.checkpoint import check_folder
    from quantlab.console import quiet_bnb_logs
    from quantlab.runtimes.transformers import load_pretrained

    quiet_bnb_logs()
    check_folder(folder, progress=False)  # truncated or corrupt shards, even behind checksums made after the damage
    g = manifest.greedy
    if g.auto_class not in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        raise QuantlabError(f"{folder}/quantlab_build.json: greedy.auto_class {g.auto_class[:60]!r} is not a class "
                            "quantlab builds")
    auto_class = getattr(transformers, g.auto_class)
    vocab = _vocab_size(folder)
    if not g.prompt_ids or any(not 0 <= i < vocab for i in g.prompt_ids) or not 1 <= g.new_tokens <= 4096:
        raise QuantlabError(f"{folder}/quantlab_build.json: the greedy check's prompt ids or token count are not ones "
                            f"this model can run (vocabulary {vocab:,})")
    model = load_pretrained(auto_class, folder, device_map=str(torch_device))
    tokens = greedy_tokens(model, g.prompt_ids, g.new_tokens, torch_device)
    del model
    if tokens != g.tokens:
        first = next((i for i, (a, b) in enumerate(zip(tokens, g.tokens)) if a != b), min(len(tokens), len(g.tokens)))
        problem = f"greedy tokens differ from the build's from position {first}: got {tokens}, recorded {g.tokens}"
        echo(f"  FAIL {problem}")
        return VerifyResult(False, (problem,), len(good), tuple(g.tokens), tuple(tokens))
    echo(f"greedy check: {len(tokens)} tokens match the build's record ({g.auto_class} on {device}; built on {g.device})")
    return VerifyResult(True, (), len(good), tuple(g.tokens), tuple(tokens))


def verify_device(name: str) -> torch.device:
    """`--device`: cpu, cuda or cuda:N, and there on this machine."""
    from quantlab.plan import resolve_device

    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", name or ""):
        raise QuantlabError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return resolve_device(name, "--device")


def _vocab_size(folder: Path) -> int:
    from quantlab.checkpoint import read_config

    config = read_config(folder)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size")
    if type(vocab) is not int or vocab < 1:
        raise QuantlabError(f"{folder}/config.json: no valid vocab_size")
    return vocab
