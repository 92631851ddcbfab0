"""Which kernels a loaded model really runs: its DeltaNet functions, its quantized Linears, its attention.

Speed figures depend on these more than on anything in a recipe (transformers' pure-torch DeltaNet
fallback prefills about an order of magnitude slower than flash-linear-attention on a GPU), so every
record names them. They are read from the live objects, never assumed from what is installed.

What the DeltaNet reader relies on, from transformers (5.17 to 5.25) and the `kernels` library (0.19):
- transformers' `use_kernel_func_from_hub_with_fallback` resolves each function, at import, to a package
  function (`implementation`, e.g. fla's) or to its own `torch_function`; both sit in the closure of the
  `wrapped` function it returns.
- From 5.25 that closure also holds `supported_devices`: inputs on any other device type (e.g. CPU) run
  `torch_function` even where the package is installed. Before, the package got inputs on every device.
- Where transformers uses `kernels` (5.25 requires 0.19; 5.17 takes only 0.16, 5.24 only 0.18), `wrapped`
  is turned into an instance of a generated `nn.Module` class `Func` whose class `forward` closes over it as
  `func`, and each GatedDeltaNet layer holds its own copy of each (`_kernel_funcs`, from
  `use_kernelized_func`), to which `Func` dispatches the layer's calls.
- `kernelize` puts a hub kernel's forward on such a copy, or on the whole layer, and records the repository
  as `_kernel_repo`; accelerate's hooks keep the replaced forward as `_old_forward`. 5.25's `from_pretrained`
  kernelizes unless told not to (`use_kernels=False`, `USE_HUB_KERNELS=0`): its mapping puts
  kernels-community/fla and mamba-ssm on CUDA layers, nothing on CPU ones.
- In 5.25 the layer calls `causal_conv1d_forward`, which calls `causal_conv1d_fn`/`causal_conv1d_update`;
  a hub kernel for `causal_conv1d_forward` therefore replaces both.
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
# Functions only ever called through another one, which a hub kernel can replace as a whole (5.25).
CALLED_THROUGH = {"causal_conv1d_fn": "causal_conv1d_forward", "causal_conv1d_update": "causal_conv1d_forward"}
UNREADABLE = "could not be read"


def kernels_of(model: torch.nn.Module) -> Kernels:
    return Kernels(
        deltanet=deltanet_kernels(model),
        linear=quantized_linear_classes(model),
        attention=getattr(getattr(model, "config", None), "_attn_implementation", None),
        compute_dtype=compute_dtype(model),
    )


def deltanet_kernels(model: torch.nn.Module) -> dict[str, str]:
    """Each DeltaNet function of the model's modeling module and what its GatedDeltaNet layers run for it.
    Keys are the function names; where the layers sit on several device types, `<name> on <device type>`."""
    found: dict[str | None, dict[str, set[str]]] = {}
    for layer, device_type in _deltanet_layers(model):
        module = sys.modules.get(type(layer).__module__) or importlib.import_module(type(layer).__module__)
        labels = found.setdefault(device_type, {})
        for name in DELTANET_FUNCTIONS:
            if getattr(module, name, None) is not None:
                labels.setdefault(name, set()).add(_label_in_layer(layer, module, name, device_type))
    return {
        name if len(found) == 1 else f"{name} on {device_type or 'an unknown device'}": _one_label(labels)
        for device_type, by_name in found.items()
        for name, labels in by_name.items()
    }


def _one_label(labels: set[str]) -> str:
    return next(iter(labels)) if len(labels) == 1 else "differs between layers: " + "; ".join(sorted(labels))


def _deltanet_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str | None]]:
    """The GatedDeltaNet layers and the device type each runs on: accelerate's execution device where a
    hook on it or on a module above it moves the inputs there (offloaded weights sit elsewhere), else the
    device of its weights."""
    executes_on, layers = {}, []
    for name, sub in model.named_modules():
        device = _execution_device(getattr(sub, "_hf_hook", None))
        if device is not None:
            executes_on[name] = device
        if type(sub).__name__.endswith("GatedDeltaNet"):
            layers.append((name, sub))
    return [(sub, _device_type(name, sub, executes_on)) for name, sub in layers]


def _execution_device(hook):
    if hook is None:
        return None
    for sub_hook in getattr(hook, "hooks", ()):  # accelerate's SequentialHook
        if (device := _execution_device(sub_hook)) is not None:
            return device
    return getattr(hook, "execution_device", None)


def _device_type(name: str, layer: torch.nn.Module, executes_on: dict) -> str | None:
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):  # the layer itself, then each module above it
        if (device := executes_on.get(".".join(parts[:depth]))) is not None:
            return _type_of(device)
    weight = next(layer.parameters(), None)
    return weight.device.type if weight is not None else None


def _type_of(device) -> str | None:
    try:
        return torch.device(device).type  # accelerate also gives a bare index: the current accelerator's
    except (RuntimeError, TypeError, ValueError):
        return None


def _label_in_layer(layer: torch.nn.Module, module, name: str, device_type: str | None) -> str:
    replaced = _replaced_forward(layer)
    if replaced is not None:
        return f"{replaced}, in place of the whole {type(layer).__name__}"
    caller = CALLED_THROUGH.get(name)
    if getattr(module, caller or "", None) is not None:
        replaced = _replaced_forward(_copy_in(layer, getattr(module, caller)))
        if replaced is not None:
            return f"{replaced}, in place of {caller}"
    return _implementation_name(_copy_in(layer, getattr(module, name)), device_type)


def _copy_in(layer: torch.nn.Module, function):
    """The layer's own copy of `function` where `use_kernelized_func` gave it one: the layer's calls go there."""
    copies = layer.__dict__.get("_kernel_funcs") or {}
    return next((copy for copy in copies.values() if type(copy) is type(function)), function)


def _replaced_forward(obj) -> str | None:
    """What stands in for the module `obj`'s own class forward; None when nothing does."""
    if not isinstance(obj, torch.nn.Module):
        return None
    state = obj.__dict__
    if state.get("_kernel_repo") is not None:
        return f"hub kernel {state['_kernel_repo']}"
    forward = state.get("_old_forward" if "_hf_hook" in state else "forward")
    if forward is None or getattr(forward, "__func__", None) is type(obj).forward:
        return None
    return f"{UNREADABLE}: {type(obj).__name__}'s forward is replaced by {getattr(forward, '__qualname__', forward)}"


def _implementation_name(function, device_type: str | None) -> str:
    """What transformers' fallback wrapper `function` runs for inputs on `device_type` (None: not known):
    the package function it resolved, or the torch fallback when it kept its own or the device is not one
    the package supports."""
    replaced = _replaced_forward(function)
    if replaced is not None:
        return replaced
    closure = _fallback_closure(function)
    if closure is None:
        if inspect.isfunction(function) and _is_transformers_function(function):
            return TORCH_FALLBACK  # not wrapped at all: transformers' own code
        return f"{UNREADABLE}: {getattr(function, '__qualname__', type(function).__name__)} is not a known wrapper"
    implementation, torch_function = closure["implementation"], closure["torch_function"]
    if implementation is None or implementation is torch_function or _is_transformers_function(implementation):
        return TORCH_FALLBACK
    supported = closure.get("supported_devices")
    if supported is not None and device_type is None:
        return f"{UNREADABLE}: the package runs on {'/'.join(supported)} only and the layer's device is not known"
    if supported is not None and device_type not in supported:
        return TORCH_FALLBACK
    return f"{implementation.__module__}.{getattr(implementation, '__qualname__', implementation)}"


def resolved_pair(function):
    """(implementation, torch reference) from transformers' `use_kernel_func_from_hub_with_fallback` wrapper,
    plain or inside kernels' `Func`; (None, None) when it is not such a wrapper. Device gating is not applied."""
    closure = _fallback_closure(function)
    return (None, None) if closure is None else (closure["implementation"], closure["torch_function"])


def _fallback_closure(function) -> dict | None:
    """The closure of transformers' fallback wrapper, found through kernels' `Func` (its class forward's
    `func`) and any `__wrapped__` chain; None when there is none."""
    seen = set()
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        cells = _closure(type(function).forward if isinstance(function, torch.nn.Module) else function)
        if "implementation" in cells and "torch_function" in cells:
            return cells
        function = cells["func"] if "func" in cells else getattr(function, "__wrapped__", None)
    return None


def _closure(function) -> dict:
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None) or ()
    names = code.co_freevars if code is not None else ()
    return {name: cell.cell_contents for name, cell in zip(names, cells) if _filled(cell)}


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


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


def check_deltanet_against_reference(device: str = "cuda", tolerance: float = 5e-2, echo=print) -> None:
    """The DeltaNet functions transformers resolved (flash-linear-attention's where it is installed) against its own
    torch reference on `device`, on random inputs (a chunked prefill of 300 tokens, one recurrent step): each one's
    implementation and relative errors through `echo`; AssertionError when output or final state differ by
    `tolerance` or more. scripts/gpu_check_all.py runs it on the GPU, in a process of its own, before trusting fla."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    torch.manual_seed(0)
    batch, tokens, heads, key_dim, value_dim = 1, 300, 4, 128, 128
    q, k = (torch.randn(batch, tokens, heads, key_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(batch, tokens, heads, value_dim, device=device, dtype=torch.bfloat16)
    g = -torch.rand(batch, tokens, heads, device=device, dtype=torch.float32)
    beta = torch.rand(batch, tokens, heads, device=device, dtype=torch.bfloat16).sigmoid()
    for name, length in (("torch_chunk_gated_delta_rule", tokens), ("torch_recurrent_gated_delta_rule", 1)):
        implementation, reference = resolved_pair(getattr(modeling, name))
        echo(f"{name}: {_implementation_name(getattr(modeling, name), device)}")
        kw = dict(query=q[:, :length], key=k[:, :length], value=v[:, :length], g=g[:, :length], beta=beta[:, :length],
                  initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True)
        out, state = _call_with(implementation, **kw)
        want, want_state = _call_with(reference, **kw)
        err, state_err = _relative_error(out, want), _relative_error(state, want_state)
        echo(f"  relative error vs transformers' torch reference: output {err:.2e}, final state {state_err:.2e}")
        if not (err < tolerance and state_err < tolerance):
            raise AssertionError(f"{name}: fla disagrees with the torch reference")
    echo("fla preflight ok")


def _call_with(function, **kw):
    """`function` with the keyword arguments its signature takes (fla's and transformers' differ)."""
    params = inspect.signature(function).parameters
    return function(**{k: v for k, v in kw.items() if k in params})


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
