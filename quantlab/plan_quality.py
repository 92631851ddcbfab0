"""The quality section's cross-field checks, run by the plan before any weights load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from quantlab import fingerprint
from quantlab.errors import QuantlabError
from quantlab.recipe import DTYPE_BYTES, ModelSpec, QualitySpec, Recipe
from quantlab.sources import GgufSource, ModelSource, resolve
from quantlab.tokenizer_match import first_difference



@dataclass(frozen=True)
class QualityPlan:
    spec: QualitySpec
    stride: int
    reference: ModelSpec
    reference_source: ModelSource
    reference_label: str  # e.g. "quantlab-bundled BF16 (bundled, bfloat16)"
    same_model: bool  # the reference is the recipe's own model spec
    vocab_size: int
    notes: tuple[str, ...] = ()


def plan_quality(
    recipe: Recipe, source: ModelSource, config: PretrainedConfig, device: torch.device, weight_bytes: int,
    for_this_machine: bool = True, prequantized: str | None = None,
) -> QualityPlan | None:
    """`prequantized`: the method label when the recipe's checkpoint is already quantized (it cannot be its own reference)."""
    spec = recipe.quality
    if spec is None:
        return None
    stride = spec.effective_stride
    if stride > spec.context:
        raise QuantlabError(f"quality.stride ({stride:,}) must not exceed quality.context ({spec.context:,})")
    if spec.tokens < spec.context:
        raise QuantlabError(
            f"quality.tokens ({spec.tokens:,}) is shorter than one window (quality.context {spec.context:,}); "
            "use more tokens or a shorter context"
        )
    _check_text_path(spec)
    reference = spec.reference.model or recipe.model
    same = reference == recipe.model
    if reference.source == "gguf" and not same:
        raise QuantlabError("quality.reference.model: source gguf cannot be the reference (its logits come from "
                            "transformers, which does not run GGUF files); name the checkpoint the GGUF was made from")
    _check_real_weights(source, "model.source")
    if same and prequantized:
        raise QuantlabError(
            f"quality: {source.location} is already quantized ({prequantized}), so it cannot be its own reference; "
            "name its unquantized base model in quality.reference.model"
        )
    ref_source = source if same else resolve(reference)
    _check_real_weights(ref_source, "quality.reference.model.source")
    ref_config = ref_source.variant()[0]
    vocab = _vocab(config)
    for what, cfg in (("the model", config), ("the reference", ref_config)):
        limit = getattr(_text(cfg), "max_position_embeddings", None)
        if limit is not None and spec.context > limit:
            raise QuantlabError(
                f"quality.context ({spec.context:,}) exceeds {what}'s max_position_embeddings ({limit:,})"
            )
    if _vocab(ref_config) != vocab:
        raise QuantlabError(
            f"quality: the reference ({ref_source.name}) has a vocabulary of {_vocab(ref_config):,} tokens and the "
            f"model ({source.name}) {vocab:,}: KL and perplexity compare distributions token by token and need "
            "the same tokenizer and vocabulary"
        )
    if isinstance(source, GgufSource) and not same:
        _check_gguf_tokenizer(source, ref_source)
    if spec.mode == "stored" and spec.top_k > vocab:
        raise QuantlabError(f"quality.top_k ({spec.top_k:,}) exceeds the vocabulary ({vocab:,} tokens)")
    notes = []
    if spec.mode == "paired" and for_this_machine:
        notes += _paired_memory(device, weight_bytes, _reference_bytes(ref_source, weight_bytes, same))
    from quantlab.methods.none import DTYPE_LABELS

    label = f"{ref_source.name} {DTYPE_LABELS[reference.dtype]} ({reference.source}, {reference.dtype})"
    return QualityPlan(spec, stride, reference, ref_source, label, same, vocab, tuple(notes))


def _check_gguf_tokenizer(source: GgufSource, reference: ModelSource) -> None:
    """The tokenizer the GGUF's header carries against the reference's, before any weights load: a GGUF is often
    published apart from the checkpoint it was made from, and may have been converted from another one."""
    gguf = source.tokenizer(required=True, what="quality")
    ref = reference.tokenizer(required=True, what="quality")
    where = first_difference(gguf, ref, "the GGUF", "the reference")
    if where is not None:
        raise QuantlabError(f"quality: the reference ({reference.name}) does not tokenize as the GGUF "
                            f"({source.location}) does: {where}; name the checkpoint the GGUF was made from")


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "a folder; use source: folder"
    return "not a regular file (a device, a pipe or a socket)" if path.exists() else "file not found"


def _check_real_weights(source: ModelSource, what: str) -> None:
    if source.synthetic:
        raise QuantlabError(
            f"{what} is 'synthetic': random weights have no tokenizer and no meaningful quality. "
            "Measure quality on real weights (bundled, hub or local), or remove the quality section."
        )


def _check_text_path(spec: QualitySpec) -> None:
    """A local held-out text must be there: found in the plan, not after the model is planned and measured."""
    if spec.source not in ("file", "folder"):
        return
    path = Path(spec.path).expanduser()
    if spec.source == "file" and not path.is_file():
        raise QuantlabError(f"quality.path: {path}: " + _not_a_file(path))
    if spec.source == "folder" and not path.is_dir():
        raise QuantlabError(f"quality.path: {path}: " + ("a file; use source: file" if path.exists() else "folder not found"))


def _text(config: PretrainedConfig) -> PretrainedConfig:
    return getattr(config, "text_config", None) or config


def _vocab(config: PretrainedConfig) -> int:
    return int(_text(config).vocab_size)


def _reference_bytes(reference: ModelSource, weight_bytes: int, same: bool) -> int:
    if same:
        return weight_bytes
    return sum(p.numel() for p in reference.meta.parameters()) * DTYPE_BYTES[reference.spec.dtype]


def _paired_memory(device: torch.device, candidate_bytes: int, reference_bytes: int) -> list[str]:
    both = candidate_bytes + reference_bytes
    advice = "use quality.mode: stored (the reference runs first and is freed before the candidate loads)"
    short = fingerprint.memory_shortfall(device, both)
    if short is None:
        return []
    if short[0] == "gpu":
        return [f"quality.mode paired keeps the reference and the candidate on {device} together "
                f"({both / 1e9:.1f} GB > {short[1] / 1e9:.1f} GB): expect OOM; {advice}"]
    raise QuantlabError(
        f"quality.mode paired keeps the reference and the candidate in host RAM together: "
        f"{both / 1e9:.1f} GB (+20% headroom) but only {short[1] / 1e9:.1f} GB is available; {advice}"
    )


def describe_quality_plan(q: QualityPlan, candidate_from: str | None = None) -> str:
    """`candidate_from`: what the candidate is scored from when not its full logits (a server's top-k)."""
    s = q.spec
    where = {"default": "the stdlib held-out split", "file": f"file {s.path}", "folder": f"folder {s.path}",
             "hub": f"Hub dataset {s.dataset}"}[s.source]
    mode = "paired (exact KL)" if s.mode == "paired" else f"stored (top-{s.top_k} + tail KL, a lower bound)"
    if candidate_from:
        mode = f"{s.mode}, the candidate scored from {candidate_from} (KL a lower bound)"
    return (f"{mode} vs {q.reference_label}: {s.tokens:,} tokens of {where}, "
            f"context {s.context:,}, stride {q.stride:,}")
