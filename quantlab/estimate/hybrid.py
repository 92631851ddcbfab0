"""The shape facts the runtime-memory model needs, read from a (text) config with clear errors."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from quantlab.errors import QuantlabError

# Fields the estimator cannot guess. A config.json without one of them is refused rather than
# completed with transformers' class defaults (which describe some other model).
REQUIRED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
DENSE_FIELDS = ("intermediate_size",)
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")
DELTANET_FIELDS = (
    "linear_num_value_heads",
    "linear_num_key_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
)
LAYOUT_FIELDS = ("layer_types", "full_attention_interval")  # either one


@dataclass(frozen=True)
class HybridShape:
    hidden: int
    layers: int
    full_attention_layers: int
    deltanet_layers: int
    vocab: int
    max_positions: int | None
    heads: int
    kv_heads: int
    head_dim: int
    attention_gate: bool  # q_proj also produces the output gate (2 × heads × head_dim wide)
    intermediate: int  # dense MLP width (0 for MoE)
    experts: int
    experts_per_token: int
    expert_intermediate: int
    shared_expert_intermediate: int
    v_heads: int
    k_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    ssm_dtype: str | None

    @property
    def conv_dim(self) -> int:
        """Channels of the DeltaNet short convolution: q and k (k_heads × k_dim each) and v."""
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


def check_fields(raw: dict, where: str) -> None:
    """Raise QuantlabError naming every field the estimator needs that a raw config.json lacks."""
    text = raw.get("text_config", raw)
    missing = [f for f in REQUIRED_FIELDS if f not in text]
    moe = "num_experts" in text
    missing += [f for f in (MOE_FIELDS if moe else DENSE_FIELDS) if f not in text]
    if not any(f in text for f in LAYOUT_FIELDS):
        missing.append("layer_types (or full_attention_interval)")
    if _has_deltanet(text.get("layer_types"), "full_attention_interval" in text):
        missing += [f for f in DELTANET_FIELDS if f not in text]
    if missing:
        raise QuantlabError(f"{where}: the config lacks fields the estimator needs: {', '.join(missing)}")


def _has_deltanet(layer_types: list[str] | None, has_interval: bool) -> bool:
    return "linear_attention" in (layer_types or []) or (layer_types is None and has_interval)


def hybrid_shape(text: PretrainedConfig) -> HybridShape:
    layer_types = list(getattr(text, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - {"full_attention", "linear_attention"})
    if unknown or not layer_types:
        raise QuantlabError(f"config: layer_types {unknown or '(empty)'} are not full_attention / linear_attention")

    def get(name: str) -> int:
        return getattr(text, name, 0) or 0

    return HybridShape(
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        full_attention_layers=layer_types.count("full_attention"),
        deltanet_layers=layer_types.count("linear_attention"),
        vocab=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None),
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        head_dim=get("head_dim") or text.hidden_size // text.num_attention_heads,
        # Qwen3.5's q_proj also makes the output gate (its configs may not say so); Qwen3's has none
        attention_gate=bool(getattr(text, "attn_output_gate", str(text.model_type).startswith("qwen3_5"))),
        intermediate=0 if get("num_experts") else get("intermediate_size"),
        experts=get("num_experts"),
        experts_per_token=get("num_experts_per_tok"),
        expert_intermediate=get("moe_intermediate_size"),
        shared_expert_intermediate=get("shared_expert_intermediate_size"),
        v_heads=get("linear_num_value_heads"),
        k_heads=get("linear_num_key_heads"),
        k_dim=get("linear_key_head_dim"),
        v_dim=get("linear_value_head_dim"),
        conv_kernel=get("linear_conv_kernel_dim"),
        ssm_dtype=getattr(text, "mamba_ssm_dtype", None),
    )
