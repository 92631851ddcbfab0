"""AWQ as data: per HF class, where the decoder layers are and which activations AWQ balances.

A mapping moves per-channel scales s from `smooth` (a norm, or a Linear feeding the next one) into
the `balance` Linears that read its output: smooth /= s, balance *= s, which leaves the float model
unchanged and makes salient input channels cheaper to quantize. `inspect` is the module whose
output the scale search compares before and after quantization (None: the balance Linears' own
outputs). Names are relative to one decoder layer; a mapping applies to the layers that have its
modules. Which Linears end up quantized is not decided here but by architecture.UNQUANTIZED_ROLES:
in_proj_a/b are balanced (they share the norm) yet stay unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AwqMapping:
    smooth: str
    balance: tuple[str, ...]
    inspect: str | None


@dataclass(frozen=True)
class AwqArchitecture:
    decoder_layers: str  # the ModuleList of decoder layers
    mappings: tuple[AwqMapping, ...]


_QWEN3_5_MAPPINGS = (
    AwqMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    # The DeltaNet block is inspected through its projections: its recurrent core has no cheap
    # stand-alone forward on every backend.
    AwqMapping(
        "input_layernorm",
        ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a"),
        None,
    ),
    AwqMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    AwqMapping("mlp.up_proj", ("mlp.down_proj",), None),
)

AWQ_ARCHITECTURES: dict[str, AwqArchitecture] = {
    "Qwen3_5ForCausalLM": AwqArchitecture("model.layers", _QWEN3_5_MAPPINGS),
    "Qwen3_5ForConditionalGeneration": AwqArchitecture("model.language_model.layers", _QWEN3_5_MAPPINGS),
}

# Linears that the clip search leaves alone: clipping query/key weights hurts attention scores
# more than it saves (AutoAWQ's rule).
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
