"""Recipe-facing configuration of each quantization method: data only, no behaviour.

Later methods (bitsandbytes, AWQ) add a config class here and join the QuantConfig union
with `method` as its discriminator; handlers live in quantlab.quantize.handlers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class NoQuant(BaseModel):
    """The unquantized baseline: weights stay in the model dtype (BF16/FP16/FP32)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["none"] = "none"


QuantConfig = NoQuant
