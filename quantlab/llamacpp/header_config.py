"""The Hugging Face config a GGUF's header stands for: what quantlab's plan, estimator and report read of a model,
rebuilt from the metadata llama.cpp's converter wrote (convert_hf_to_gguf.py's Qwen3.5 class, read backwards).

Only the architectures quantlab measures are mapped; any other is refused by name. Each key is the converter's
(gguf-py's constants.py names them `{arch}.…`); a header that lacks one is a clear error naming it.
"""

from __future__ import annotations

from quantlab.errors import QuantlabError
from quantlab.llamacpp.gguf_file import GgufHeader

# GGUF architecture -> the transformers model_type of the text model it was converted from
ARCHITECTURES = {"qwen35": "qwen3_5_text"}


def check_architecture(header: GgufHeader) -> None:
    if header.architecture not in ARCHITECTURES:
        known = ", ".join(f"{a} ({t})" for a, t in ARCHITECTURES.items())
        raise QuantlabError(f"{header.path}: a GGUF of architecture {header.architecture[:60]!r}; quantlab measures "
                            f"{known}: the Qwen3.5/3.6 hybrid models")


def header_config(header: GgufHeader):
    """transformers' text config with the sizes the header gives."""
    from transformers import AutoConfig

    check_architecture(header)
    meta, arch = header.metadata, header.architecture

    def key(name: str):
        value = meta.get(f"{arch}.{name}")
        if value is None:
            raise QuantlabError(f"{header.path}: its header has no {arch}.{name}, which llama.cpp's converter writes "
                                "for this architecture (a damaged or hand-made file)")
        return value

    mtp = int(meta.get(f"{arch}.nextn_predict_layers") or 0)
    layers = int(key("block_count")) - mtp
    heads, rank = int(key("attention.head_count")), int(key("ssm.time_step_rank"))
    head_dim = int(key("attention.key_length"))
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if isinstance(recurrent, list) and len(recurrent) >= layers:
        layer_types = ["linear_attention" if r else "full_attention" for r in recurrent[:layers]]
    else:
        interval = int(key("full_attention_interval"))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    sections = [int(s) for s in key("rope.dimension_sections")][:3]
    fields = dict(
        vocab_size=_vocab(header), hidden_size=int(key("embedding_length")), intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=int(key("attention.head_count_kv")),
        head_dim=head_dim, max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(f"{float(key('attention.layer_norm_rms_epsilon')):.6g}"),  # stored as float32
        linear_conv_kernel_dim=int(key("ssm.conv_kernel")), linear_key_head_dim=int(key("ssm.state_size")),
        linear_num_key_heads=int(key("ssm.group_count")), linear_num_value_heads=rank,
        linear_value_head_dim=int(key("ssm.inner_size")) // rank, layer_types=layer_types,
        tie_word_embeddings=not any(t.name == "output.weight" for t in header.tensors),
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base")), "mrope_interleaved": True,
                         "mrope_section": sections,
                         "partial_rotary_factor": int(key("rope.dimension_count")) / head_dim},
    )
    if mtp:
        fields["mtp_num_hidden_layers"] = mtp
    try:
        return AutoConfig.for_model(ARCHITECTURES[arch], **fields)
    except (ValueError, TypeError) as exc:
        raise QuantlabError(f"{header.path}: its header's sizes make no model transformers can build "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _vocab(header: GgufHeader) -> int:
    """The embedding table's rows (gguf-py lists a tensor's shape fastest dimension first: [hidden, vocab])."""
    for t in header.tensors:
        if t.name == "token_embd.weight" and len(t.shape) == 2:
            return int(t.shape[1])
    raise QuantlabError(f"{header.path}: no token_embd.weight tensor, so no vocabulary size (not a model GGUF)")
