"""`rtn`: plain round-to-nearest, simulated (weights quantized, then dequantized in place). The reference point
AWQ must beat on quality; memory and speed stay at the model dtype."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from quantlab.architecture import TENSOR_CLASS_NAMES, class_modules, quantizable_linears
from quantlab.fields import IntOnly
from quantlab.methods.base import Method, MethodConfig, register
from quantlab.quantize.groupwise import check_group_size, fake_quantize


class RtnConfig(MethodConfig):
    """Plain round-to-nearest, simulated: weights are quantized then dequantized in place."""

    method: Literal["rtn"]
    bits: Annotated[Literal[2, 3, 4, 8], IntOnly] = 4
    group_size: Annotated[Literal[32, 64, 128], IntOnly] = 128
    zero_point: bool = True
    # Per tensor class (quantlab.architecture.TENSOR_CLASSES): its bits, 16 leaving it unquantized. A class named
    # here is quantized even where plain RTN leaves it (lm_head, embeddings, in_proj_a/b).
    overrides: dict[str, Annotated[Literal[2, 3, 4, 8, 16], IntOnly]] = Field(default_factory=dict)
    only: list[str] | None = Field(None, description="quantize these classes only, the rest stays unquantized")

    @field_validator("overrides", "only")
    @classmethod
    def _known_classes(cls, value):
        unknown = sorted(set(value or ()) - set(TENSOR_CLASS_NAMES))
        if unknown:
            raise ValueError(f"unknown tensor class(es) {unknown}; classes: {', '.join(TENSOR_CLASS_NAMES)}")
        return value


@register
class RtnMethod(Method):
    name = "rtn"
    config = RtnConfig
    in_process = "RTN is simulated on the loaded model, in quantlab's process, and writes no checkpoint a server can load"
    sensitivity_option = "--high-bits"

    def label(self, qconfig: RtnConfig, dtype: str) -> str:
        mixed = ""
        if qconfig.only is not None:
            mixed = f", only {'+'.join(qconfig.only)}"
        elif qconfig.overrides:
            mixed = ", " + ", ".join(f"{k} {'kept' if b == 16 else f'int{b}'}" for k, b in sorted(qconfig.overrides.items()))
        return f"RTN int{qconfig.bits} g{qconfig.group_size}{mixed} (simulated)"

    def check(self, qconfig: RtnConfig, source) -> None:
        check_group_size([(name, _in_features(m)) for name, m, _ in plan_bits(source.meta, qconfig)], qconfig.group_size)

    @torch.no_grad()
    def apply(self, model: torch.nn.Module, qconfig: RtnConfig) -> torch.nn.Module:
        planned = plan_bits(model, qconfig)
        check_group_size([(name, _in_features(m)) for name, m, _ in planned], qconfig.group_size)
        for _, module, bits in planned:
            quantized = fake_quantize(module.weight, bits, qconfig.group_size, qconfig.zero_point)
            module.weight.copy_(quantized.to(module.weight.dtype))
        return model


def plan_bits(model: torch.nn.Module, qconfig: RtnConfig) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, bits) of what RTN quantizes: plain RTN's Linears at `bits`, then the overrides and `only`."""
    default = {name for name, _ in quantizable_linears(model, "rtn")}
    planned = []
    for kind, name, module in class_modules(model):
        if qconfig.only is not None:
            bits = qconfig.overrides.get(kind, qconfig.bits) if kind in qconfig.only else 16
        else:
            bits = qconfig.overrides.get(kind, qconfig.bits if name in default else 16)
        if bits < 16:
            planned.append((name, module, bits))
    return planned


def _in_features(module: torch.nn.Module) -> int:
    return module.in_features if isinstance(module, torch.nn.Linear) else module.embedding_dim
