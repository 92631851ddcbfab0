"""The quantization methods quantlab knows: one module each, registered by config type (methods/base.py).

Adding a method is a module in this folder and one line below. The recipe's `quantization` field is the union
of the registered config classes, told apart by their `method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import Field

# Importing a method module registers it, in this order (the order recipes' errors and tables list them).
from quantlab.methods import none  # noqa: F401,I001
from quantlab.methods import rtn  # noqa: F401,I001
from quantlab.methods import bnb  # noqa: F401,I001
from quantlab.methods import awq  # noqa: F401,I001
from quantlab.methods import gguf  # noqa: F401,I001
from quantlab.checkpoint_formats import format_of
from quantlab.methods.base import Method, MethodConfig, method_for, registered
from quantlab.schema.build import build_method

METHODS: dict[str, Method] = {m.name: m for m in registered()}
CONFIG_CLASSES: tuple[type[MethodConfig], ...] = tuple(m.config for m in METHODS.values())
QuantConfig = Annotated[Union[CONFIG_CLASSES], Field(discriminator="method")]
NoQuant = none.NoQuant
__all__ = ["CONFIG_CLASSES", "METHODS", "CheckpointMethod", "Method", "MethodConfig", "NoQuant", "QuantConfig",
           "checkpoint_method", "config_class", "known_methods", "method_for", "method_named"]


def known_methods() -> list[str]:
    return list(METHODS)


def config_class(name: str) -> type[MethodConfig] | None:
    method = METHODS.get(name)
    return method.config if method else None


def method_named(name: str) -> Method | None:
    return METHODS.get(name)


@dataclass(frozen=True)
class CheckpointMethod:
    """The method of a checkpoint that is already quantized (a `quantization_config` in its config.json)."""

    name: str  # a recipe method where quantlab knows it, else the checkpoint's quant_method
    label: str
    params: dict[str, Any]
    quant_method: str  # as written in the checkpoint, e.g. "bitsandbytes"
    notes: tuple[str, ...] = ()  # what the plan says of loading it


def checkpoint_method(config, folder=None) -> CheckpointMethod | None:
    """None for an unquantized checkpoint. A quantlab build says exactly (its manifest holds the recipe's method);
    otherwise each registered method is asked whether the quantization_config is its own."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    quant_method = str(qc.get("quant_method", "unknown"))
    built = build_method(folder) if folder else None
    if built is not None:
        return CheckpointMethod(built["name"], built["label"], dict(built["params"]), quant_method)
    for method in METHODS.values():
        found = method.from_checkpoint(qc)
        if found is not None:
            return CheckpointMethod(method.name, found[0], found[1], quant_method)
    fmt = format_of(quant_method)
    label = fmt.label(qc) if fmt else f"{quant_method} (pre-quantized)"
    return CheckpointMethod(quant_method, label, qc, quant_method)
