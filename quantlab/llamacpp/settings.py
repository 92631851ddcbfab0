"""The llama.cpp runtime's settings as a recipe gives them (`measure.llama_cpp`), typed here, at the bottom, as
torchao keeps its configs: the recipe validates them, the runtime reads them, and neither owns them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from quantlab.fields import STRICT
from quantlab.strict_yaml import excerpt


def _gpu_layers(value: Any) -> Any:
    """One problem, said once, for a value that is neither 'all' nor a layer count (not two from the union)."""
    if value is None or value == "all" or (type(value) is int and 0 <= value <= 10_000):
        return value
    raise ValueError(f"{excerpt(value)}: a whole number of layers from 0 to 10,000, or 'all'")


class LlamaCppSpec(BaseModel):
    """The llama.cpp runtime's settings (measure.runtime: llama.cpp), as llama-bench and llama-server name them."""

    model_config = STRICT

    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (-t); default: the cores quantlab uses")
    gpu_layers: Annotated[int | Literal["all"] | None, BeforeValidator(_gpu_layers)] = Field(
        None, description="layers offloaded to the GPU (-ngl); default: all on a GPU, none on the CPU; records say "
        "how many llama.cpp offloaded (at most the model's layers + 1)")
    flash_attn: Literal["auto", "on", "off"] = "auto"
    kv_type: Literal["f16", "q8_0"] = Field("f16", description="KV cache type, K and V (-ctk/-ctv)")
    slots: int = Field(1, ge=1, le=64, description="parallel sequence slots (-np): each gets its own recurrent state")
    ubatch: int = Field(512, ge=1, le=65536, description="micro-batch (-ub)")
    batch: int = Field(2048, ge=1, le=65536, description="logical batch (-b)")
