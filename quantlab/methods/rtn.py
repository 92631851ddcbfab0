"""`rtn`: plain round-to-nearest, simulated (weights quantized, then dequantized in place). The reference point
AWQ must beat on quality; memory and speed stay at the model dtype."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from quantlab.architecture import quantizable_linears
from quantlab.fields import IntOnly
from quantlab.methods.base import Method, MethodConfig, register
from quantlab.quantize.groupwise import check_group_size, fake_quantize


class RtnConfig(MethodConfig):
    """Plain round-to-nearest, simulated: weights are quantized then dequantized in place."""

    method: Literal["rtn"]
    bits: Annotated[Literal[2, 3, 4, 8], IntOnly] = 4
    group_size: Annotated[Literal[32, 64, 128], IntOnly] = 128
    zero_point: bool = True


@register
class RtnMethod(Method):
    name = "rtn"
    config = RtnConfig

    def label(self, qconfig: RtnConfig, dtype: str) -> str:
        return f"RTN int{qconfig.bits} g{qconfig.group_size} (simulated)"

    def check(self, qconfig: RtnConfig, source) -> None:
        check_group_size([(n, m.in_features) for n, m in quantizable_linears(source.meta, "rtn")], qconfig.group_size)

    @torch.no_grad()
    def apply(self, model: torch.nn.Module, qconfig: RtnConfig) -> torch.nn.Module:
        linears = quantizable_linears(model, "rtn")
        check_group_size([(n, m.in_features) for n, m in linears], qconfig.group_size)
        for _, module in linears:
            quantized = fake_quantize(module.weight, qconfig.bits, qconfig.group_size, qconfig.zero_point)
            module.weight.copy_(quantized.to(module.weight.dtype))
        return model
