"""Round-to-nearest weight quantization, simulated (quantize, then dequantize in place)."""

from __future__ import annotations

import torch

from quantlab.architecture import quantizable_linears
from quantlab.errors import QuantlabError
from quantlab.quantize.configs import RtnConfig
from quantlab.quantize.groupwise import fake_quantize


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
        module.weight.copy_(fake_quantize(module.weight, qconfig.bits, qconfig.group_size, qconfig.zero_point).to(module.weight.dtype))
    return model
