"""Checkpoints that are already quantized (a `quantization_config` in config.json): which method.

transformers loads them as they are; quantlab only needs to name the method for records and the
report. A quantlab build says exactly (its quantlab_build.json holds the recipe's method);
otherwise the method is read from the quantization_config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from quantlab.schema.build import build_method
from quantlab.quantize import bnb


@dataclass(frozen=True)
class CheckpointMethod:
    name: str  # a recipe method where quantlab knows it (bnb_int8, bnb_4bit), else the quant_method
    label: str
    params: dict[str, Any]
    quant_method: str  # as written in the checkpoint, e.g. "bitsandbytes"


def quantization_config_of(config: PretrainedConfig) -> dict[str, Any] | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def checkpoint_method(config: PretrainedConfig, folder: str | None = None) -> CheckpointMethod | None:
    """None for an unquantized checkpoint. `folder`: a local folder, checked for a quantlab build manifest."""
    qc = quantization_config_of(config)
    if not qc:
        return None
    quant_method = str(qc.get("quant_method", "unknown"))
    built = build_method(folder) if folder else None
    if built is not None:
        return CheckpointMethod(built["name"], built["label"], dict(built["params"]), quant_method)
    parsed = bnb.config_from_checkpoint(qc)
    if parsed is not None:
        qconfig, skip = parsed
        params = {**qconfig.model_dump(), "checkpoint_skip_modules": skip}
        return CheckpointMethod(qconfig.method, bnb.label(qconfig), params, quant_method)
    if quant_method == "awq":
        label = f"AWQ W{qc.get('bits', '?')}A16 g{qc.get('group_size', '?')} (pre-quantized)"
        return CheckpointMethod("awq", label, qc, quant_method)
    return CheckpointMethod(quant_method, f"{quant_method} (pre-quantized)", qc, quant_method)
