"""A config's sizes, checked before `quantlab estimate` builds anything from them.

transformers takes any integer: `intermediate_size: 2**62` or `num_experts: -8` reach torch as a tensor shape and
fail deep inside it, and `num_experts: 0` or more experts per token than experts are estimated as if they made
sense. Every size is held to a range that covers real models with room to spare (the largest open models have
hidden sizes near 16k, vocabularies near 260k, a few hundred experts), and the MoE fields to each other. Each
problem is one clause of one message, naming the field and the value.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from quantlab.checkpoint import MAX_LAYERS
from quantlab.errors import QuantlabError

K = 1024
# field -> (least, most): a size or count the estimator reads from the text config
TEXT_BOUNDS = {
    "hidden_size": (1, 64 * K),
    "intermediate_size": (1, K * K),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, K),
    "num_key_value_heads": (1, K),
    "head_dim": (1, K),
    "vocab_size": (1, 4 * K * K),
    "max_position_embeddings": (1, 1 << 28),
    "num_experts": (1, 16 * K),
    "num_experts_per_tok": (1, 16 * K),
    "moe_intermediate_size": (1, K * K),
    "shared_expert_intermediate_size": (1, K * K),
    "linear_num_key_heads": (1, K),
    "linear_num_value_heads": (1, K),
    "linear_key_head_dim": (1, K),
    "linear_value_head_dim": (1, K),
    "linear_conv_kernel_dim": (1, 64),
    "mtp_num_hidden_layers": (0, 16),
}
VISION_BOUNDS = {
    "depth": (1, MAX_LAYERS),
    "hidden_size": (1, 64 * K),
    "intermediate_size": (1, K * K),
    "num_heads": (1, K),
    "out_hidden_size": (1, 64 * K),
    "patch_size": (1, K),
    "in_channels": (1, 64),
    "spatial_merge_size": (1, 64),
    "temporal_patch_size": (1, 64),
    "num_position_embeddings": (1, 1 << 24),
}
MAX_PARAMETERS = 10**14  # 100 trillion: fifty times the largest open model
SHOWN = 8  # problems named in one message; the rest are counted


def check_config_values(config: PretrainedConfig, where: str) -> None:
    """QuantlabError naming every size of `config` out of its range and every inconsistency between them."""
    raw = config.to_dict()
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    prefix = "text_config." if text is not raw else ""
    problems = out_of_bounds(text, TEXT_BOUNDS, prefix)
    if isinstance(raw.get("vision_config"), dict):
        problems += out_of_bounds(raw["vision_config"], VISION_BOUNDS, "vision_config.")
    if not problems:  # comparisons only between values that are themselves sane
        problems = inconsistencies(text, prefix)
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise QuantlabError(f"{where}: the config cannot be estimated: {'; '.join(problems[:SHOWN])}{more}")


def out_of_bounds(part: dict, bounds: dict[str, tuple[int, int]], prefix: str) -> list[str]:
    problems = []
    for name, (least, most) in bounds.items():
        value = part.get(name)
        if value is None:
            continue  # missing fields are check_fields' to name
        if type(value) is not int or not least <= value <= most:
            problems.append(f"{prefix}{name} is {_excerpt(value)}; it must be an integer from {least:,} to {most:,}")
    return problems


def inconsistencies(text: dict, prefix: str) -> list[str]:
    """Fields that are each in range but do not fit together."""
    problems = []
    experts, per_token = text.get("num_experts"), text.get("num_experts_per_tok")
    if experts is not None and per_token is not None and per_token > experts:
        problems.append(f"{prefix}num_experts_per_tok is {per_token:,}, more than the {experts:,} experts "
                        f"({prefix}num_experts) a token can be routed to")
    heads, kv_heads = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"{prefix}num_attention_heads ({heads:,}) is not a multiple of {prefix}num_key_value_heads "
                        f"({kv_heads:,}): each KV head serves a whole group of query heads")
    k_heads, v_heads = text.get("linear_num_key_heads"), text.get("linear_num_value_heads")
    if k_heads and v_heads and v_heads % k_heads:
        problems.append(f"{prefix}linear_num_value_heads ({v_heads:,}) is not a multiple of "
                        f"{prefix}linear_num_key_heads ({k_heads:,})")
    layer_types, layers = text.get("layer_types"), text.get("num_hidden_layers")
    if isinstance(layer_types, list) and layers and len(layer_types) != layers:
        problems.append(f"{prefix}layer_types lists {len(layer_types):,} layers, {prefix}num_hidden_layers says "
                        f"{layers:,}")
    return problems


def check_parameter_count(parameters: int, where: str) -> None:
    if parameters > MAX_PARAMETERS:
        raise QuantlabError(f"{where}: the config describes {parameters:.3g} parameters; quantlab estimates models of "
                            f"at most {MAX_PARAMETERS:.0e} (100 trillion)")


def excerpt_number(value: int) -> str:
    """The number, or its size where it is too long to show (or to format: Python refuses 4,300+ digits)."""
    if abs(value) < 10**30:
        return f"{value:,}"
    digits = int(value.bit_length() * 0.30103) + 1
    digits -= 10 ** (digits - 1) > abs(value)  # the estimate from the bit length can be one over
    return f"{'-' if value < 0 else ''}an integer of {digits:,} digits"


def _excerpt(value) -> str:
    text = excerpt_number(value) if type(value) is int else repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
