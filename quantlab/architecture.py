"""Architecture as data: what each tensor of a model is, and which ones each method leaves alone.

Tensor roles are regex mappings keyed by the HF model class, so a new family is a new table,
not a new class. The skip rules (UNQUANTIZED_ROLES) are the single place that the quantizers,
the estimator and the model card all read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MTP_PREFIX = "mtp."  # the multi-token-prediction head's tensors: in checkpoints, dropped by transformers at load

# Roles, in report order.
ROLES = (
    "embed_tokens",
    "lm_head",
    "full_attention_linear",
    "deltanet_linear",
    "deltanet_small_linear",
    "deltanet_conv_and_params",
    "mlp",
    "routed_experts",
    "shared_expert",
    "router",
    "norm",
    "vision",
    "mtp",
)

ROLE_LABELS = {
    "embed_tokens": "embeddings",
    "lm_head": "lm_head",
    "full_attention_linear": "full-attention projections",
    "deltanet_linear": "DeltaNet projections",
    "deltanet_small_linear": "DeltaNet in_proj_a/b",
    "deltanet_conv_and_params": "DeltaNet conv1d, A_log, dt_bias",
    "mlp": "MLP",
    "routed_experts": "routed experts",
    "shared_expert": "shared expert",
    "router": "router",
    "norm": "norms",
    "vision": "vision tower",
    "mtp": "MTP",
}


_QWEN3_5_TEXT = (
    (r"(^|\.)embed_tokens\.weight$", "embed_tokens"),
    (r"^lm_head\.weight$", "lm_head"),
    (r"\.self_attn\.(q|k|v|o)_proj\.weight$", "full_attention_linear"),
    (r"\.self_attn\.(q|k)_norm\.weight$", "norm"),
    (r"\.linear_attn\.(in_proj_qkv|in_proj_z|out_proj)\.weight$", "deltanet_linear"),
    (r"\.linear_attn\.(in_proj_a|in_proj_b)\.weight$", "deltanet_small_linear"),
    (r"\.linear_attn\.(conv1d\.weight|A_log|dt_bias)$", "deltanet_conv_and_params"),
    (r"\.linear_attn\.norm\.weight$", "norm"),
    (r"\.mlp\.(gate|up|down)_proj\.weight$", "mlp"),
    (r"(layernorm|\.norm)\.weight$", "norm"),
)
_QWEN3_5_FULL = (
    (r"^mtp\.", "mtp"),
    (r"(^|\.)visual\.", "vision"),
    *_QWEN3_5_TEXT,
)

# Qwen3.5 MoE (e.g. Qwen3.5-397B-A17B): fused 3-D expert tensors, one shared expert with its
# sigmoid gate, and the top-k router. Checked before the dense rules.
_QWEN3_5_MOE_MLP = (
    (r"\.mlp\.experts\.(gate_up_proj|down_proj)$", "routed_experts"),
    (r"\.mlp\.shared_expert\.(gate|up|down)_proj\.weight$", "shared_expert"),
    (r"\.mlp\.(gate|shared_expert_gate)\.weight$", "router"),
)

# Keyed by HF class name. The MTP rule is in every table: the checkpoint carries mtp.* even
# where the transformers class drops it at load.
TENSOR_ROLES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "Qwen3_5ForCausalLM": ((r"^mtp\.", "mtp"), *_QWEN3_5_TEXT),
    # Qwen3 dense: every layer full attention, the same tensor names (no DeltaNet, no output gate, no MTP)
    "Qwen3ForCausalLM": _QWEN3_5_TEXT,
    "Qwen3_5ForConditionalGeneration": _QWEN3_5_FULL,
    "Qwen3_5MoeForCausalLM": ((r"^mtp\.", "mtp"), *_QWEN3_5_MOE_MLP, *_QWEN3_5_TEXT),
    "Qwen3_5MoeForConditionalGeneration": (*_QWEN3_5_FULL[:2], *_QWEN3_5_MOE_MLP, *_QWEN3_5_TEXT),
}

# Roles each method leaves unquantized. `none` quantizes nothing, so it is not listed.
# in_proj_a/b (out = number of DeltaNet value heads, 48) are kept: too small to matter and,
# for bitsandbytes 4-bit, not a multiple of 32 (its AVX512 CPU kernel fails on them).
UNQUANTIZED_ROLES: Mapping[str, frozenset[str]] = {
    **{
        method: frozenset(
            {"embed_tokens", "lm_head", "deltanet_small_linear", "deltanet_conv_and_params", "norm", "vision", "mtp"}
        )
        for method in ("bnb_int8", "bnb_4bit", "awq", "rtn")
    },
    # GGUF (llama.cpp's llama-quantize): every 2-D `.weight` is quantized, embeddings and
    # in_proj_a/b (ssm_alpha/beta) included, but not norms, 1-D tensors, ssm_conv1d or the MoE
    # router (ffn_gate_inp). The MTP head is written as one more block (blk.64) and quantized like
    # one (estimate/gguf_mix.py). The vision tower lives in a separate mmproj file: kept at the
    # model dtype when counted.
    **{
        method: frozenset({"deltanet_conv_and_params", "norm", "router", "vision"})
        for method in ("gguf_q8_0", "gguf_q6_k", "gguf_q4_k_m")
    },
}

# Unquantized roles that a method stores in float32 whatever the model dtype: llama.cpp's
# converter writes 1-D tensors, norms, ssm_conv1d and ffn_gate_inp as F32.
FLOAT32_ROLES: Mapping[str, frozenset[str]] = {
    method: frozenset({"deltanet_conv_and_params", "norm", "router"})
    for method in ("gguf_q8_0", "gguf_q6_k", "gguf_q4_k_m")
}


def quantizable_linears(model, method: str) -> list[tuple[str, "torch.nn.Linear"]]:
    """The nn.Linear modules a method quantizes: every Linear whose role it does not skip."""
    import torch

    class_name, skipped = type(model).__name__, UNQUANTIZED_ROLES[method]
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and role_of(class_name, f"{name}.weight") not in skipped
    ]


# Tensor classes, finer than roles: what `quantlab sensitivity` quantizes one at a time and what per-class
# overrides name. Module-name patterns, matched in order; the first match wins.
TENSOR_CLASSES: tuple[tuple[str, str], ...] = (
    ("mtp", r"(^|\.)mtp\."),
    ("deltanet.in_proj_qkv", r"\.linear_attn\.in_proj_qkv$"),
    ("deltanet.in_proj_z", r"\.linear_attn\.in_proj_z$"),
    ("deltanet.in_proj_ab", r"\.linear_attn\.in_proj_(a|b)$"),
    ("deltanet.out_proj", r"\.linear_attn\.out_proj$"),
    ("attention.q", r"\.self_attn\.q_proj$"),
    ("attention.k", r"\.self_attn\.k_proj$"),
    ("attention.v", r"\.self_attn\.v_proj$"),
    ("attention.o", r"\.self_attn\.o_proj$"),
    ("moe.shared_expert", r"\.shared_expert\.(gate|up|down)_proj$"),
    ("mlp.gate", r"\.mlp\.gate_proj$"),
    ("mlp.up", r"\.mlp\.up_proj$"),
    ("mlp.down", r"\.mlp\.down_proj$"),
    ("lm_head", r"(^|\.)lm_head$"),
    ("embeddings", r"(^|\.)embed_tokens$"),
)
TENSOR_CLASS_NAMES = tuple(name for name, _ in TENSOR_CLASSES)


def tensor_class(module_name: str) -> str | None:
    """The class of a module (a Linear or the embedding table) by its name; None for anything else."""
    return next((name for name, pattern in TENSOR_CLASSES if re.search(pattern, module_name)), None)


def class_modules(model) -> list[tuple[str, str, "torch.nn.Module"]]:
    """(class, module name, module) for every Linear and Embedding a tensor class names, vision tower excluded."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and "visual" not in name:
            kind = tensor_class(name)
            if kind is not None:
                found.append((kind, name, module))
    return found


def supported_classes() -> list[str]:
    return sorted(TENSOR_ROLES)


def role_of(class_name: str, tensor_name: str) -> str:
    """The role of one tensor; raises KeyError for an unknown class or an unmatched name."""
    rules = TENSOR_ROLES[class_name]
    for pattern, role in rules:
        if re.search(pattern, tensor_name):
            return role
    raise KeyError(f"{class_name}: no role for tensor {tensor_name!r}")


def role_label(role: str) -> str:
    return ROLE_LABELS.get(role, role)
