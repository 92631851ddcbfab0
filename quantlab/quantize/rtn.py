"""Round-to-nearest weight quantization, simulated (quantize, then dequantize in place)."""

from __future__ import annotations

import torch

from quantlab.architecture import quantizable_linears
from quantlab.errors import QuantlabError
from quantlab.quantize.configs import RtnConfig


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """Per-group min-max (asymmetric) or absmax (symmetric) rounding along in_features."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    if zero_point:
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
        w = (q - zero) * scale
    else:
        scale = (w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
        w = torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    return w.reshape(out_features, in_features).to(weight.dtype)


def check_group_size(model_linears: list[tuple[str, int]], group_size: int) -> None:
    bad = [name for name, in_features in model_linears if in_features % group_size]
    if bad:
        raise QuantlabError(
            f"quantization.group_size {group_size} does not divide in_features of {len(bad)} layer(s), "
            f"e.g. {bad[0]}; use a group size that divides them (32, 64 or 128)"
        )


@torch.no_grad()
def apply_rtn(model: torch.nn.Module, qconfig: RtnConfig) -> torch.nn.Module:
    linears = quantizable_linears(model, "rtn")
    check_group_size([(n, m.in_features) for n, m in linears], qconfig.group_size)
    for _, module in linears:
        module.weight.copy_(fake_quantize(module.weight, qconfig.bits, qconfig.group_size, qconfig.zero_point))
    return model
