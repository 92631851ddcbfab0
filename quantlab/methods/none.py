"""`none`: the unquantized baseline, weights in the model dtype (BF16/FP16/FP32)."""

from __future__ import annotations

from typing import Literal

from quantlab.methods.base import Method, MethodConfig, register

DTYPE_LABELS = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}
SCHEMES = {"bfloat16": "bf16", "float16": "fp16"}


class NoQuant(MethodConfig):
    """The unquantized baseline: weights stay in the model dtype (BF16/FP16/FP32)."""

    method: Literal["none"] = "none"


@register
class NoneMethod(Method):
    name = "none"
    config = NoQuant

    def label(self, qconfig: NoQuant, dtype: str) -> str:
        return DTYPE_LABELS[dtype]

    def estimator_scheme(self, params: dict, dtype: str) -> str | None:
        return SCHEMES.get(dtype)
