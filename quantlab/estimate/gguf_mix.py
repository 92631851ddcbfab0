"""Per-tensor ggml types of a GGUF file, after llama.cpp's `llama_tensor_get_type_impl`.

Source: ggml-org/llama.cpp `src/llama-quant.cpp` (read in 2026-11). What the Q8_0, Q6_K and
Q4_K_M file types do to a dense or MoE qwen35 model, and nothing more:
- output.weight (lm_head): Q6_K, unless the default type is Q8_0 (then Q8_0);
- token_embd: the default type (the model is untied);
- "attn_v-like" tensors, attn_v and attn_qkv (qwen35 names DeltaNet's in_proj_qkv
  `blk.N.attn_qkv`, so every layer has exactly one): Q4_K_M uses Q6_K where
  use_more_bits(i, n), i counting them in layer order, n their number;
- ffn_down (dense, routed-expert and shared-expert): Q4_K_M uses Q6_K where
  use_more_bits(layer, n_layers);
- the MTP head: llama.cpp's converter writes it as one more block (blk.N after the N decoder layers, as
  current llama.cpp does by default), quantized under the same rules, as the last layer: its attn_v
  and ffn_down count as layer N of N + 1 (use_more_bits: Q6_K under Q4_K_M), its eh_proj (mtp.fc)
  takes the default type, its norms stay F32;
- everything else: the default type. Rows whose length is not a multiple of the block fall
  back (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, then F16), as `tensor_type_fallback` does.
Older llama.cpp builds gave attn_qkv Q5_K under Q4_K_M instead; for Qwen3.6-27B that differs
by 0.01 GB. Unsloth's published files may add their own per-tensor upgrades on top.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from quantlab.estimate.inventory import TensorGroup
from quantlab.llamacpp.names import ATTN_V_LIKE_HF_NAMES

_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class MixContext:
    """What the per-layer rules need to know about the whole model."""

    n_layers: int
    attn_v_layers: tuple[int, ...]  # layers holding an attn_v-like tensor, in order
    mtp_layers: int = 0  # MTP blocks, written after the decoder layers (blk.n_layers, ...)


def mix_context(groups: tuple[TensorGroup, ...], n_layers: int) -> MixContext:
    layers = sorted({i for g in groups if g.role != "mtp" and g.name.endswith(ATTN_V_LIKE_HF_NAMES) for i in g.layers})
    mtp = {i for g in groups if g.role == "mtp" and ".layers.{i}." in g.name for i in g.layers}
    return MixContext(n_layers, tuple(layers), len(mtp))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_types(group: TensorGroup, default: str, mix: str | None, ctx: MixContext) -> Counter[str]:
    """ggml type → number of tensors of the group stored in it."""
    return Counter(
        with_fallback(_chosen_type(group, layer, default, mix, ctx), group.row_length)
        for layer in (group.layers or (-1,))
    )


def _chosen_type(group: TensorGroup, layer: int, default: str, mix: str | None, ctx: MixContext) -> str:
    if group.role == "lm_head":
        return default if default == "Q8_0" else "Q6_K"
    if mix != "q4_k_m" or group.role == "embed_tokens":
        return default
    mtp = group.role == "mtp"
    n_attn_v = len(ctx.attn_v_layers) + ctx.mtp_layers
    if group.name.endswith(ATTN_V_LIKE_HF_NAMES):
        index = len(ctx.attn_v_layers) + layer if mtp else ctx.attn_v_layers.index(layer)
        return "Q6_K" if use_more_bits(index, n_attn_v) else default
    if "down_proj" in group.name and use_more_bits(ctx.n_layers + layer if mtp else layer, ctx.n_layers + ctx.mtp_layers):
        return "Q6_K"
    return default


def with_fallback(ggml_type: str, row_length: int) -> str:
    if row_length % block_size(ggml_type) == 0:
        return ggml_type
    fallback = _FALLBACK.get(ggml_type, "F16")
    return fallback if row_length % block_size(fallback) == 0 else "F16"


def block_size(ggml_type: str) -> int:
    return _quant_size(ggml_type)[0]


def row_bytes(ggml_type: str, row_length: int) -> int:
    block, type_size = _quant_size(ggml_type)
    return row_length // block * type_size


def _quant_size(ggml_type: str) -> tuple[int, int]:
    from quantlab.errors import QuantlabError
    from quantlab.extras import install_hint, installed

    if not installed("gguf"):
        raise QuantlabError(f"the GGUF schemes' block sizes come from the gguf package, not installed here: "
                            f"{install_hint('gguf')}")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
