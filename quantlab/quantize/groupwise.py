"""Group-wise integer quantization of a Linear weight along in_features: one implementation, shared by
plain round-to-nearest (the `rtn` method) and AWQ (which searches scales and clipping around it).

W ≈ (code - zero) * scale per group. Min-max with a zero point (asymmetric), or absmax with the
constant zero 2**(bits-1) (symmetric), computed in float32. Same rounding as AutoAWQ's pseudo_quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlab.errors import QuantlabError


@dataclass(frozen=True)
class GroupQuant:
    codes: torch.Tensor  # [out, in] uint8, 0 .. 2**bits - 1
    scales: torch.Tensor  # [out, in / group_size] float32
    zeros: torch.Tensor  # [out, in / group_size] uint8


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> GroupQuant:
    """Min-max (asymmetric) or absmax (symmetric) rounding per group, in float32."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    levels = 2**bits - 1
    if zero_point:
        low, high = w.amin(-1), w.amax(-1)
        scales = ((high - low) / levels).clamp(min=1e-5)
        zeros = torch.clamp(-torch.round(low / scales), 0, levels)
    else:
        scales = (w.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp(min=1e-5)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    codes = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, levels)
    return GroupQuant(codes.reshape(out_features, in_features).to(torch.uint8), scales, zeros.to(torch.uint8))


def dequantize_groups(q: GroupQuant, group_size: int) -> torch.Tensor:
    scales = q.scales.repeat_interleave(group_size, dim=1)
    zeros = q.zeros.repeat_interleave(group_size, dim=1)
    return (q.codes.float() - zeros.float()) * scales


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """Quantize then dequantize, in float32 (the scale and clip searches compare these)."""
    return dequantize_groups(quantize_groups(weight, bits, group_size, zero_point), group_size)


# Large weights are processed a slice of rows at a time: the float32 temporaries of a whole
# 17408 × 5120 matrix would be several hundred MB each.
ROW_CHUNK_ELEMENTS = 1 << 22


def row_step(weight: torch.Tensor) -> int:
    return max(1, ROW_CHUNK_ELEMENTS // weight.shape[1])


def quantize_rows(weight: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> GroupQuant:
    """quantize_groups, a slice of rows at a time."""
    step = row_step(weight)
    parts = [quantize_groups(weight[i:i + step], bits, group_size, zero_point) for i in range(0, weight.shape[0], step)]
    return GroupQuant(*(torch.cat(t) for t in zip(*((p.codes, p.scales, p.zeros) for p in parts))))


def fake_quantize_scaled(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, zero_point: bool,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Q(W · s) / s in W's dtype (`scales` per input channel), a slice of rows at a time, into `out`."""
    out = torch.empty_like(weight) if out is None else out
    step = row_step(weight)
    for i in range(0, weight.shape[0], step):
        scaled = weight[i:i + step].float() * scales
        out[i:i + step] = (fake_quantize(scaled, bits, group_size, zero_point) / scales).to(weight.dtype)
    return out


def scale_columns(weight: torch.Tensor, factor: torch.Tensor) -> None:
    """weight *= factor per input channel, in place, computed in float32 a slice of rows at a time."""
    step = row_step(weight)
    for i in range(0, weight.shape[0], step):
        weight[i:i + step] = (weight[i:i + step].float() * factor).to(weight.dtype)


def check_group_size(model_linears: list[tuple[str, int]], group_size: int) -> None:
    bad = [name for name, in_features in model_linears if in_features % group_size]
    if bad:
        raise QuantlabError(
            f"quantization.group_size {group_size} does not divide in_features of {len(bad)} layer(s), "
            f"e.g. {bad[0]}; use a group size that divides them (32, 64 or 128)"
        )
