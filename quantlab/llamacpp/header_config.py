"""The Hugging Face config a GGUF's header stands for: what quantlab's plan, estimator and report read of a model,
rebuilt from the metadata llama.cpp's converter wrote (convert_hf_to_gguf.py's Qwen3.5 class, read backwards).

Only the architectures quantlab measures are mapped; any other is refused by name. Each key is the converter's
(gguf-py's constants.py names them `{arch}.…`); a header that lacks one is a clear error naming it.
"""

from __future__ import annotations

import math

from quantlab.checkpoint import MAX_LAYERS, check_config_sizes
from quantlab.errors import QuantlabError
from quantlab.llamacpp.gguf_file import GgufHeader

# GGUF architecture -> the transformers model_type of the text model it was converted from
ARCHITECTURES = {"qwen35": "qwen3_5_text"}
MAX_SIZE = 1 << 24  # any width, count or head size of a real model is far below; a header above it is damaged
MAX_POSITIONS = 1 << 24  # context_length: 16M tokens, beyond any model's positions


def check_architecture(header: GgufHeader) -> None:
    if header.architecture not in ARCHITECTURES:
        known = ", ".join(f"{a} ({t})" for a, t in ARCHITECTURES.items())
        raise QuantlabError(f"{header.path}: a GGUF of architecture {header.architecture[:60]!r}; quantlab measures "
                            f"{known}: the Qwen3.5/3.6 hybrid models")


def header_config(header: GgufHeader):
    """transformers' text config with the sizes the header gives, each checked before it is used."""
    from transformers import AutoConfig

    check_architecture(header)
    read = _Keys(header)
    mtp = read.whole("nextn_predict_layers", default=0, least=0)
    blocks = read.whole("block_count")
    layers = blocks - mtp
    if not 1 <= layers <= MAX_LAYERS:
        raise QuantlabError(f"{header.path}: block_count {blocks:,} with nextn_predict_layers {mtp:,} leaves {layers:,} "
                            f"decoder layers; quantlab handles 1 to {MAX_LAYERS} (a damaged or hand-edited header)")
    head_dim, rank = read.whole("attention.key_length"), read.whole("ssm.time_step_rank")
    fields = dict(
        vocab_size=_vocab(header), hidden_size=_checked_width(header, read.whole("embedding_length")),
        intermediate_size=read.whole("feed_forward_length"), num_hidden_layers=layers,
        num_attention_heads=read.whole("attention.head_count"), num_key_value_heads=read.whole("attention.head_count_kv"),
        head_dim=head_dim, max_position_embeddings=read.whole("context_length", most=MAX_POSITIONS),
        rms_norm_eps=float(f"{read.number('attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
        linear_conv_kernel_dim=read.whole("ssm.conv_kernel"), linear_key_head_dim=read.whole("ssm.state_size"),
        linear_num_key_heads=read.whole("ssm.group_count"), linear_num_value_heads=rank,
        linear_value_head_dim=read.whole("ssm.inner_size") // rank, layer_types=_layer_types(header, read, layers),
        tie_word_embeddings=not any(t.name == "output.weight" for t in header.tensors),
        rope_parameters={"rope_type": "default", "rope_theta": read.number("rope.freq_base"), "mrope_interleaved": True,
                         "mrope_section": read.sections("rope.dimension_sections"),
                         "partial_rotary_factor": read.whole("rope.dimension_count") / head_dim},
    )
    if mtp:
        fields["mtp_num_hidden_layers"] = mtp
    check_config_sizes(fields, f"{header.path}: its header")
    try:
        return AutoConfig.for_model(ARCHITECTURES[header.architecture], **fields)
    except (ValueError, TypeError) as exc:
        raise QuantlabError(f"{header.path}: its header's sizes make no model transformers can build "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None


class _Keys:
    """The header's `{arch}.*` values, each refused with its name when missing or not a number in range."""

    def __init__(self, header: GgufHeader):
        self.header, self.arch = header, header.architecture

    def raw(self, name: str, default=None):
        value = self.header.metadata.get(f"{self.arch}.{name}", default)
        if value is None:
            raise QuantlabError(f"{self.header.path}: its header has no {self.arch}.{name}, which llama.cpp's converter "
                                "writes for this architecture (a damaged or hand-made file)")
        return value

    def number(self, name: str) -> float:
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise QuantlabError(f"{self.header.path}: its header's {self.arch}.{name} is {str(value)[:40]!r}, not a number")
        return float(value)

    def whole(self, name: str, default=None, least: int = 1, most: int = MAX_SIZE) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not least <= value <= most:
            raise QuantlabError(f"{self.header.path}: its header's {self.arch}.{name} is {str(value)[:40]!r}; a whole "
                                f"number from {least} to {most:,} is expected (a damaged or hand-edited header)")
        return int(value)

    def sections(self, name: str) -> list[int]:
        value = self.raw(name)
        if not isinstance(value, list) or len(value) < 3 or not all(isinstance(v, int) and v >= 0 for v in value[:3]):
            raise QuantlabError(f"{self.header.path}: its header's {self.arch}.{name} is {str(value)[:40]!r}, not the "
                                "rope sections llama.cpp writes (a list of whole numbers)")
        return [int(v) for v in value[:3]]


def _layer_types(header: GgufHeader, read: _Keys, layers: int) -> list[str]:
    recurrent = header.metadata.get(f"{header.architecture}.attention.recurrent_layers")
    if isinstance(recurrent, list) and len(recurrent) >= layers:
        return ["linear_attention" if r else "full_attention" for r in recurrent[:layers]]
    interval = read.whole("full_attention_interval")
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]


def _checked_width(header: GgufHeader, width: int) -> int:
    """The embedding table's width must be the header's embedding_length: keys and tensors from one model."""
    for t in header.tensors:
        if t.name == "token_embd.weight" and len(t.shape) == 2 and t.shape[0] != width:
            raise QuantlabError(f"{header.path}: its header says embedding_length {width:,}, its token_embd tensor is "
                                f"{t.shape[0]:,} wide: the metadata and the tensors disagree (a damaged or hand-edited "
                                "file)")
    return width


def _vocab(header: GgufHeader) -> int:
    """The embedding table's rows (gguf-py lists a tensor's shape fastest dimension first: [hidden, vocab])."""
    for t in header.tensors:
        if t.name == "token_embd.weight" and len(t.shape) == 2:
            return int(t.shape[1])
    raise QuantlabError(f"{header.path}: no token_embd.weight tensor, so no vocabulary size (not a model GGUF)")
