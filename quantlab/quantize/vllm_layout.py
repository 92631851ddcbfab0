"""How vLLM names and skips the layers of a quantized checkpoint, as data, so a skip list can be written that
both transformers and vLLM read as intended.

transformers (`should_convert_module`) matches `modules_to_not_convert` against its own module names, as a
prefix ending at a module boundary or as a suffix. vLLM first rewrites the list with the model's
`hf_to_vllm_mapper` (prefix rules that end in a dot), then, for AWQ, calls `is_layer_skipped(...,
skip_with_substr=True)`: a layer is skipped when any entry is a substring of its name; a fused layer
(`qkv_proj`, `gate_up_proj`, `in_proj_qkvz`, `in_proj_ba`) is looked up through each of its checkpoint
parts, and the parts must agree. Its names differ from transformers': the vision tower is `visual.*`
(so `model.visual` never matches it) and the MTP draft's layers are `mtp.*`, built with the main model's
quantization config (vllm/model_executor/models/qwen3_5.py, qwen3_5_mtp.py, qwen3_vl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VllmNaming:
    prefix_map: dict[str, str]  # hf_to_vllm_mapper.orig_to_new_prefix
    packed: dict[str, tuple[str, ...]]  # packed_modules_mapping: fused layer -> checkpoint parts
    extra_skips: tuple[str, ...] = field(default=())  # entries only vLLM needs (its own names)


_QWEN3_5_PACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}

VLLM_NAMING: dict[str, VllmNaming] = {
    "Qwen3_5ForConditionalGeneration": VllmNaming(
        prefix_map={"model.visual.": "visual.", "lm_head.": "language_model.lm_head.",
                    "model.language_model.": "language_model.model."},
        packed=_QWEN3_5_PACKED,
        extra_skips=("visual", "mtp"),
    ),
    "Qwen3_5ForCausalLM": VllmNaming(prefix_map={}, packed=_QWEN3_5_PACKED, extra_skips=("mtp",)),
}


def serving_skip_list(model_class: str, transformers_patterns: tuple[str, ...]) -> tuple[str, ...]:
    """transformers' patterns, then the entries vLLM needs for the same intent (the vision tower under its
    own name, and the MTP draft, whose checkpoint tensors stay unquantized)."""
    naming = VLLM_NAMING.get(model_class)
    extra = naming.extra_skips if naming else ()
    return tuple(transformers_patterns) + tuple(e for e in extra if e not in transformers_patterns)


def map_name(name: str, naming: VllmNaming) -> str:
    for old, new in naming.prefix_map.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def vllm_layers(hf_linears: list[str], naming: VllmNaming) -> dict[str, tuple[str, ...]]:
    """vLLM's Linear layers for a checkpoint's Linear names: {vLLM layer: the checkpoint Linears it holds}."""
    part_of = {part: fused for fused, parts in naming.packed.items() for part in parts}
    layers: dict[str, list[str]] = {}
    for hf in hf_linears:
        mapped = map_name(hf, naming)
        parent, _, leaf = mapped.rpartition(".")
        fused = part_of.get(leaf)
        layer = f"{parent}.{fused}" if fused else mapped
        layers.setdefault(layer, []).append(hf)
    return {layer: tuple(parts) for layer, parts in layers.items()}


def vllm_skips_layer(layer: str, skip_list: tuple[str, ...], naming: VllmNaming) -> bool:
    """vLLM's `is_layer_skipped(prefix, ignored, fused_mapping, skip_with_substr=True)` after its mapper rewrote
    the list; raises ValueError where the parts of a fused layer disagree, as vLLM does."""
    ignored = [map_name(entry, naming) for entry in skip_list]
    parent, _, leaf = layer.rpartition(".")
    shards = [f"{parent}.{part}" for part in naming.packed[leaf]] if leaf in naming.packed else [layer]
    verdicts = {shard: any(entry in shard for entry in ignored) for shard in shards}
    if len(set(verdicts.values())) > 1:
        raise ValueError(f"vLLM: some but not all parts of fused layer {layer} are skipped: {verdicts}")
    return next(iter(verdicts.values()))


def vllm_reading(hf_linears: list[str], skip_list: tuple[str, ...], naming: VllmNaming) -> dict[str, bool | None]:
    """{vLLM layer: whether vLLM skips it}; None where the parts of a fused layer disagree (vLLM refuses those)."""
    reading: dict[str, bool | None] = {}
    for layer in vllm_layers(hf_linears, naming):
        try:
            reading[layer] = vllm_skips_layer(layer, skip_list, naming)
        except ValueError:
            reading[layer] = None
    return reading
