"""Group-wise integer quantization and the AWQ GEMM checkpoint layout (AutoAWQ's `version: gemm`).

For a Linear with weight W [out, in], groups of `group_size` along `in`:
- qweight [in, out / 8] int32: eight 4-bit codes per word, columns interleaved in AWQ_ORDER;
- qzeros  [in / group_size, out / 8] int32: the zero points, packed the same way;
- scales  [in / group_size, out] in the model dtype.
W ≈ (code - zero) * scale (quantlab/quantize/groupwise.py). Symmetric quantization stores the zero 2**(bits-1).
This is the layout transformers (through gptqmodel's kernels), vLLM and SGLang read as `quant_method: awq`.
"""

from __future__ import annotations

import torch

from quantlab.quantize.groupwise import GroupQuant

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_BITS = 4
PER_WORD = 32 // PACK_BITS


def _pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] of 4-bit codes -> [rows, cols / 8] int32, AWQ column order."""
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows, cols // PER_WORD, PER_WORD)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, PACK_BITS, device=values.device, dtype=torch.int64)
    words = (grouped << shifts).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def pack_gemm(q: GroupQuant, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The three tensors of one quantized Linear, keyed by suffix (qweight, qzeros, scales)."""
    if q.codes.shape[0] % PER_WORD:
        raise ValueError(f"AWQ GEMM packing needs out_features divisible by {PER_WORD}, got {q.codes.shape[0]}")
    codes = q.codes.t()  # [in, out]
    step = max(1, (1 << 22) // codes.shape[1])
    qweight = torch.cat([_pack_columns(codes[i:i + step]) for i in range(0, codes.shape[0], step)])
    return {
        "qweight": qweight,
        "qzeros": _pack_columns(q.zeros.t().contiguous()),
        "scales": q.scales.t().contiguous().to(dtype),
    }
