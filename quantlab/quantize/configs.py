"""Recipe-facing configuration of each quantization method: data only, no behaviour.

A method is one config class with a literal `method`; CONFIG_CLASSES lists them and
QuantConfig is their union, discriminated by `method`. Handlers live in quantize/handlers.py.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, Field

from quantlab.fields import STRICT, IntOnly, Seed
from quantlab.textsource import TextSourceSpec


class _QuantConfigBase(BaseModel):
    model_config = STRICT


class NoQuant(_QuantConfigBase):
    """The unquantized baseline: weights stay in the model dtype (BF16/FP16/FP32)."""

    method: Literal["none"] = "none"


class RtnConfig(_QuantConfigBase):
    """Plain round-to-nearest, simulated: weights are quantized then dequantized in place.

    The reference point that AWQ must beat on quality. Memory stays at the model dtype.
    """

    method: Literal["rtn"]
    bits: Annotated[Literal[2, 3, 4, 8], IntOnly] = 4
    group_size: Annotated[Literal[32, 64, 128], IntOnly] = 128
    zero_point: bool = True


class BnbInt8Config(_QuantConfigBase):
    """bitsandbytes LLM.int8: int8 weights, one absmax scale per output row, outliers above
    `threshold` computed in 16-bit (0 turns the mixed-precision decomposition off).

    Which Linears stay unquantized comes from quantlab.architecture (UNQUANTIZED_ROLES);
    `skip_modules` adds module names or patterns (transformers' llm_int8_skip_modules syntax).
    """

    method: Literal["bnb_int8"]
    threshold: float = Field(6.0, ge=0.0, le=1000.0)
    skip_modules: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=64)


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
    skip_modules: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=64)


class CalibrationSpec(TextSourceSpec):
    """AWQ's calibration text, cut into `samples` windows of `seq_len` tokens drawn with `seed`.

    Default: the Python standard library's "calibration" split, gathered on this machine at run time
    (source code suits a coding model; nothing is downloaded or copied into the repository).
    """

    WHERE: ClassVar[str] = "quantization.calibration"

    DEFAULT_SPLIT: ClassVar[str] = "train"
    samples: int = Field(128, ge=1, le=100_000, description="calibration windows")
    seq_len: int = Field(512, ge=16, le=32_768, description="tokens per window")
    seed: Seed = Field(0, description="which windows are drawn")


class AwqConfig(_QuantConfigBase):
    """AWQ W4A16: 4-bit weights in groups along in_features, activation-aware scales and clipping
    searched on calibration text, written as `quant_method: awq`, `version: gemm` checkpoints.

    Which Linears stay unquantized comes from quantlab.architecture (UNQUANTIZED_ROLES["awq"]).
    `engine` picks the implementation (quantlab/quantize/awq/); the checkpoint format is the same.
    """

    method: Literal["awq"]
    bits: Annotated[Literal[4], IntOnly] = 4
    group_size: Annotated[Literal[32, 64, 128], IntOnly] = 128
    zero_point: bool = True
    engine: Literal["quantlab", "gptqmodel"] = "quantlab"
    clip: bool = Field(True, description="search a clipping threshold per group after the scales")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    batch_size: int = Field(8, ge=1, le=1024, description="calibration windows per forward pass")


CONFIG_CLASSES: tuple[type[_QuantConfigBase], ...] = (NoQuant, RtnConfig, BnbInt8Config, Bnb4bitConfig, AwqConfig)

QuantConfig = Annotated[Union[CONFIG_CLASSES], Field(discriminator="method")]


def known_methods() -> list[str]:
    return [c.model_fields["method"].annotation.__args__[0] for c in CONFIG_CLASSES]


def config_class(method: str) -> type[_QuantConfigBase] | None:
    return dict(zip(known_methods(), CONFIG_CLASSES)).get(method)
