"""Recipe-facing configuration of each quantization method: data only, no behaviour.

A method is one config class with a literal `method`; CONFIG_CLASSES lists them and
QuantConfig is their union, discriminated by `method`. Handlers live in quantize/handlers.py.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _QuantConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoQuant(_QuantConfigBase):
    """The unquantized baseline: weights stay in the model dtype (BF16/FP16/FP32)."""

    method: Literal["none"] = "none"


class RtnConfig(_QuantConfigBase):
    """Plain round-to-nearest, simulated: weights are quantized then dequantized in place.

    The reference point that AWQ must beat on quality. Memory stays at the model dtype.
    """

    method: Literal["rtn"]
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[32, 64, 128] = 128
    zero_point: bool = True


class BnbInt8Config(_QuantConfigBase):
    """bitsandbytes LLM.int8: int8 weights, one absmax scale per output row, outliers above
    `threshold` computed in 16-bit (0 turns the mixed-precision decomposition off).

    Which Linears stay unquantized comes from quantlab.architecture (UNQUANTIZED_ROLES);
    `skip_modules` adds module names or patterns (transformers' llm_int8_skip_modules syntax).
    """

    method: Literal["bnb_int8"]
    threshold: float = Field(6.0, ge=0.0, le=1000.0)
    skip_modules: list[str] = Field(default_factory=list)


class Bnb4bitConfig(_QuantConfigBase):
    """bitsandbytes 4-bit (NF4 or FP4) in blocks of 64, optionally with the absmax statistics
    themselves quantized (double quant). `compute_dtype` is the matmul dtype; `quant_storage`
    the container dtype of the packed weights (uint8, or a float for FSDP-style sharding).
    """

    method: Literal["bnb_4bit"]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    skip_modules: list[str] = Field(default_factory=list)


CONFIG_CLASSES: tuple[type[_QuantConfigBase], ...] = (NoQuant, RtnConfig, BnbInt8Config, Bnb4bitConfig)

QuantConfig = Annotated[Union[CONFIG_CLASSES], Field(discriminator="method")]


def known_methods() -> list[str]:
    return [c.model_fields["method"].annotation.__args__[0] for c in CONFIG_CLASSES]


def config_class(method: str) -> type[_QuantConfigBase] | None:
    return dict(zip(known_methods(), CONFIG_CLASSES)).get(method)
