"""Which kernels a loaded model really runs: its DeltaNet functions, its quantized Linears, its attention.

Speed figures depend on these more than on anything in a recipe (transformers' pure-torch DeltaNet
fallback prefills about an order of magnitude slower than flash-linear-attention on a GPU), so every
record names them. They are read from the live objects, never assumed from what is installed.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch
from quantlab.schema.measurement import TORCH_FALLBACK, Kernels

# The functions transformers' qwen3_5 modeling resolves, at import, to an optimised package or to its
# own torch reference (`use_kernel_func_from_hub_with_fallback`).
DELTANET_FUNCTIONS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


def kernels_of(model: torch.nn.Module) -> Kernels:
    return Kernels(
        deltanet=deltanet_kernels(model),
        linear=quantized_linear_classes(model),
        attention=getattr(getattr(model, "config", None), "_attn_implementation", None),
        compute_dtype=compute_dtype(model),
    )


def deltanet_kernels(model: torch.nn.Module) -> dict[str, str]:
    """Each DeltaNet function of the model's modeling module and the implementation it resolved to."""
    module = _deltanet_modeling_module(model)
    if module is None:
        return {}
    found = {}
    for name in DELTANET_FUNCTIONS:
        function = getattr(module, name, None)
        if function is not None:
            found[name] = _implementation_name(function)
    return found


def _deltanet_modeling_module(model: torch.nn.Module):
    for sub in model.modules():
        if type(sub).__name__.endswith("GatedDeltaNet"):
            return sys.modules.get(type(sub).__module__) or importlib.import_module(type(sub).__module__)
    return None


def _implementation_name(function) -> str:
    """The `implementation` transformers' decorator closed over; the torch reference when it kept its own."""
    implementation, torch_function = resolved_pair(function)
    if implementation is None or implementation is torch_function or _is_transformers_function(implementation):
        return TORCH_FALLBACK
    return f"{implementation.__module__}.{getattr(implementation, '__qualname__', implementation)}"


def resolved_pair(function):
    """(implementation, torch reference) from transformers' `use_kernel_func_from_hub_with_fallback` wrapper,
    looked for through its closure and any `__wrapped__` chain; (None, None) when it is not such a wrapper."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        try:
            closure = inspect.getclosurevars(function).nonlocals
        except (TypeError, ValueError):
            closure = {}
        if closure.get("implementation") is not None:
            return closure["implementation"], closure.get("torch_function")
        function = getattr(function, "__wrapped__", None)
    return None, None


def _is_transformers_function(function) -> bool:
    return str(getattr(function, "__module__", "")).startswith("transformers.")


def quantized_linear_classes(model: torch.nn.Module) -> tuple[str, ...]:
    """Classes of the Linear layers that hold quantized weights (anything that is not a plain nn.Linear
    but replaces one: bitsandbytes' Linear8bitLt/Linear4bit, gptqmodel's AWQ kernels)."""
    names = set()
    for sub in model.modules():
        cls = type(sub)
        if cls is torch.nn.Linear:
            continue
        if hasattr(sub, "qweight") or cls.__name__ in ("Linear8bitLt", "Linear4bit"):
            names.add(cls.__name__)
    return tuple(sorted(names))


def compute_dtype(model: torch.nn.Module) -> str:
    """The dtype of the input embeddings as loaded: what the unquantized parts and activations run in."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(weight.dtype).removeprefix("torch.") if weight is not None else "unknown"
