"""One table of GGUF tensor names: the tensor classes of quantlab.architecture.TENSOR_CLASSES as llama.cpp names
them in qwen35 files, the class of a GGUF tensor name, and the anchored patterns llama-quantize's --tensor-type
takes. Every module that names a GGUF tensor (the gguf method, sensitivity, the estimator's llama.cpp mix) reads it
here.
"""

from __future__ import annotations

import re

# Tensor classes (quantlab.architecture.TENSOR_CLASSES) → the GGUF tensor names llama.cpp gives them in qwen35 files,
# for llama-quantize's --tensor-type NAME=TYPE
GGUF_TENSOR_NAMES = {
    "deltanet.in_proj_qkv": ("attn_qkv",), "deltanet.in_proj_z": ("attn_gate",),
    "deltanet.in_proj_ab": ("ssm_alpha", "ssm_beta"), "deltanet.out_proj": ("ssm_out",),
    "attention.q": ("attn_q",), "attention.k": ("attn_k",), "attention.v": ("attn_v",),
    "attention.o": ("attn_output",), "mlp.gate": ("ffn_gate",), "mlp.up": ("ffn_up",), "mlp.down": ("ffn_down",),
    "lm_head": ("output",), "embeddings": ("token_embd",),
}
MTP_CLASS = "mtp"  # the MTP block (blk.N, N the main model's layer count), as a whole: an override class of its own
OVERRIDE_CLASSES = (*GGUF_TENSOR_NAMES, MTP_CLASS)
CLASS_OF_NAME = {gguf: kind for kind, names in GGUF_TENSOR_NAMES.items() for gguf in names}
UNQUANTIZED_TYPES = frozenset({"BF16", "F16", "F32"})
# The Hugging Face tensors llama.cpp's type mix treats as attn_v (src/llama-quant.cpp: in qwen35 files the
# DeltaNet layers' fused QKV takes attn_v's rules), by the names they have in the checkpoint
ATTN_V_LIKE_HF_NAMES = ("self_attn.v_proj.weight", "linear_attn.in_proj_qkv.weight")


def gguf_class(tensor: str, mtp_blocks: frozenset[int] = frozenset()) -> str | None:
    """The tensor class (quantlab.architecture.TENSOR_CLASSES) of a GGUF tensor name; None for the rest."""
    if tensor == "output.weight":
        return "lm_head"
    if tensor == "token_embd.weight":
        return "embeddings"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", tensor)
    if match is None:
        return None
    if int(match.group(1)) in mtp_blocks:
        return "mtp"
    return CLASS_OF_NAME.get(match.group(2))


def class_tensors(header) -> dict[str, list]:
    """Class → the header's tensors of that class that llama-quantize quantized."""
    nextn = int(header.metadata.get(f"{header.architecture}.nextn_predict_layers") or 0)
    blocks = header.block_count or 0
    mtp = frozenset(range(blocks - nextn, blocks))
    found: dict[str, list] = {}
    for t in header.tensors:
        kind = gguf_class(t.name, mtp)
        if kind is not None and t.type_name not in UNQUANTIZED_TYPES:
            found.setdefault(kind, []).append(t)
    return found


def tensor_type_args(overrides: dict[str, str], mtp_block: int | None = None) -> list[str]:
    """llama-quantize's --tensor-type flags for per-class overrides. Anchored: llama-quantize searches each pattern
    in the tensor name, so a bare `attn_q` would also take attn_qkv, and `output` attn_output. The `mtp` class is
    the MTP block (blk.`mtp_block`, the converter's one past the last layer), every weight of it; it comes first,
    since llama-quantize takes the first pattern that matches and the class patterns match that block too."""
    args = []
    if MTP_CLASS in overrides:
        if mtp_block is None:
            raise ValueError("an override of the MTP block needs its block number")
        args += ["--tensor-type", rf"^blk\.{mtp_block}\.={overrides[MTP_CLASS].lower()}"]
    return args + [arg for cls, kind in sorted(overrides.items()) if cls != MTP_CLASS for name in GGUF_TENSOR_NAMES[cls]
                   for arg in ("--tensor-type", f"{_tensor_pattern(name)}={kind.lower()}")]


def _tensor_pattern(name: str) -> str:
    return rf"^{name}\.weight$" if name in ("output", "token_embd") else rf"^blk\.\d+\.{name}\.weight$"
