"""Which DeltaNet kernels quantlab says a model runs, read from transformers' wrappers in each form they take:
the plain `wrapped` function (5.17 without kernels), kernels' `Func` module (5.25), the device gate (5.25),
and a hub kernel put in place by `kernelize`. Each check also calls the wrapper where it can, so the label
is compared with what really runs."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
from transformers.integrations import hub_kernels
from transformers.models.qwen3_5 import modeling_qwen3_5

from quantlab.kernels import TORCH_FALLBACK, UNREADABLE, _implementation_name, deltanet_kernels, resolved_pair

from conftest import tiny_qwen3_5_config

FAKE = "fakefla.ops.chunk_gated_delta_rule"
TRANSFORMERS_USES_KERNELS = isinstance(modeling_qwen3_5.torch_chunk_gated_delta_rule, torch.nn.Module)
TRANSFORMERS_GATES_DEVICES = hasattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES")
needs_kernels = pytest.mark.skipif(not TRANSFORMERS_USES_KERNELS, reason="this transformers does not use `kernels`")
needs_device_gate = pytest.mark.skipif(not TRANSFORMERS_GATES_DEVICES,
                                       reason="this transformers gives packages inputs on every device")


def torch_chunk(query, key):
    return "torch"


@pytest.fixture
def package(monkeypatch):
    """A resolvable stand-in for fla: `use_kernel_func_from_hub_with_fallback(..., "fakefla")` finds it."""
    def chunk_gated_delta_rule(query, key):
        return "package"

    chunk_gated_delta_rule.__module__, chunk_gated_delta_rule.__qualname__ = "fakefla.ops", "chunk_gated_delta_rule"
    fake = types.ModuleType("fakefla")
    fake.chunk_gated_delta_rule = chunk_gated_delta_rule
    monkeypatch.setitem(sys.modules, "fakefla", fake)
    monkeypatch.setattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES", {}, raising=False)  # no gate unless a test sets one
    return chunk_gated_delta_rule


def wrap(package_name: str):
    return hub_kernels.use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", package_name)(torch_chunk)


def test_plain_wrapper_as_transformers_5_17_builds_it(package, monkeypatch):
    monkeypatch.setattr(hub_kernels, "use_kernel_forward_from_hub", lambda name: lambda function: function)
    found, missing = wrap("fakefla"), wrap("no_such_package_here")
    assert inspect.isfunction(found) and inspect.isfunction(missing)
    x = torch.zeros(1)
    assert found(x, x) == "package" and missing(x, x) == "torch"
    for device_type in ("cpu", "cuda"):  # no device gate in this form: the package gets every input
        assert _implementation_name(found, device_type) == FAKE
        assert _implementation_name(missing, device_type) == TORCH_FALLBACK
    assert resolved_pair(found) == (package, torch_chunk) and resolved_pair(missing) == (torch_chunk, torch_chunk)


@needs_kernels
def test_kernels_func_module_as_transformers_5_25_builds_it(package):
    found, missing = wrap("fakefla"), wrap("no_such_package_here")
    assert isinstance(found, torch.nn.Module) and isinstance(missing, torch.nn.Module)
    with pytest.raises(TypeError):
        inspect.getclosurevars(found)  # what the reader used to rely on
    x = torch.zeros(1)
    assert found(x, x) == "package" and missing(x, x) == "torch"
    assert _implementation_name(found, "cuda") == FAKE
    assert _implementation_name(missing, "cuda") == TORCH_FALLBACK
    assert resolved_pair(found) == (package, torch_chunk) and resolved_pair(missing) == (torch_chunk, torch_chunk)


def test_the_gpu_check_gets_the_torch_reference_out_of_the_modeling_module():
    """scripts/gpu_check_all.py calls both halves of `resolved_pair` (there: fla and the reference, on CUDA)."""
    implementation, reference = resolved_pair(modeling_qwen3_5.torch_recurrent_gated_delta_rule)
    assert inspect.isfunction(reference) and reference.__name__ == "torch_recurrent_gated_delta_rule"
    assert implementation is reference  # no fla on this machine
    q, k, v = (torch.randn(1, 1, 2, 8) for _ in range(3))
    out, state = reference(q, k, v, g=-torch.rand(1, 1, 2), beta=torch.rand(1, 1, 2), output_final_state=True)
    assert out.shape == (1, 1, 2, 8) and state.shape == (1, 2, 8, 8)


# ---- the device gate (5.25): the package only gets inputs on the device types it is listed for ----------
# (transformers without the gate reads `_PACKAGE_SUPPORTED_DEVICES` nowhere: its wrappers ignore what is set here)

class FakeGatedDeltaNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj_qkv = torch.nn.Linear(2, 2)


@pytest.fixture
def gated_model(package, monkeypatch):
    """Two GatedDeltaNet layers of a modeling module whose chunk rule resolved to fakefla, listed for cuda."""
    monkeypatch.setitem(hub_kernels._PACKAGE_SUPPORTED_DEVICES, "fakefla", ("cuda",))  # the `package` fixture's {}
    module = types.ModuleType("fake_modeling")
    module.torch_chunk_gated_delta_rule = wrap("fakefla")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(FakeGatedDeltaNet, "__module__", module.__name__)
    blocks = [torch.nn.ModuleDict({"linear_attn": FakeGatedDeltaNet()}) for _ in range(2)]
    return torch.nn.ModuleDict({"layers": torch.nn.ModuleList(blocks)})


def on_cuda(block):
    """What accelerate's device_map leaves on a decoder layer: a hook that moves its inputs to the GPU."""
    block._hf_hook = types.SimpleNamespace(execution_device=torch.device("cuda", 0))


@needs_device_gate
def test_device_gate_picks_the_torch_fallback_off_the_packages_devices(gated_model):
    function = sys.modules["fake_modeling"].torch_chunk_gated_delta_rule
    assert function(torch.zeros(1), torch.zeros(1)) == "torch"  # fakefla is installed, but this is a CPU input
    assert _implementation_name(function, "cpu") == TORCH_FALLBACK
    assert _implementation_name(function, "cuda") == FAKE
    assert _implementation_name(function, None).startswith(UNREADABLE)


def test_kernels_of_a_model_say_what_each_device_type_runs(gated_model):
    name = "torch_chunk_gated_delta_rule"
    ran = sys.modules["fake_modeling"].torch_chunk_gated_delta_rule(torch.zeros(1), torch.zeros(1))
    on_cpu = {"torch": TORCH_FALLBACK, "package": FAKE}[ran]
    assert on_cpu == (TORCH_FALLBACK if TRANSFORMERS_GATES_DEVICES else FAKE)
    assert deltanet_kernels(gated_model) == {name: on_cpu}
    on_cuda(gated_model.layers[1])
    assert deltanet_kernels(gated_model) == {f"{name} on cpu": on_cpu, f"{name} on cuda": FAKE}
    on_cuda(gated_model.layers[0])
    assert deltanet_kernels(gated_model) == {name: FAKE}
    gated_model.to("meta")  # offloaded weights: the hooks still run the layers on the GPU
    assert deltanet_kernels(gated_model) == {name: FAKE}


# ---- a hub kernel that `kernelize` puts in place (transformers 5.25's from_pretrained kernelizes by default) ----

class HubKernelRan(Exception):
    pass


class LocalRepository:
    """Stands in for a hub repository, offline: `kernelize` only calls `load`."""

    def __init__(self, replaced):
        self.replaced = replaced

    def load(self):
        def forward(self, *args, **kwargs):
            raise HubKernelRan

        forward.__signature__ = inspect.signature(type(self.replaced).forward)  # kernels checks it matches
        return type("HubLayer", (torch.nn.Module,), {"forward": forward})

    def __str__(self):
        return "`local/hub-kernel`"


def tiny_layer():
    return modeling_qwen3_5.Qwen3_5GatedDeltaNet(tiny_qwen3_5_config().text_config, layer_idx=0)


def kernelize_with(layer, replaced):
    from kernels import Mode, kernelize, use_kernel_mapping

    mapping = {type(replaced).kernel_layer_name: {"cpu": LocalRepository(replaced)}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(layer, mode=Mode.INFERENCE, device="cpu")


HUB = "hub kernel `local/hub-kernel`"
CONV = ("causal_conv1d_fn", "causal_conv1d_update")


@needs_kernels
@pytest.mark.parametrize("target", ["torch_chunk_gated_delta_rule", "causal_conv1d_forward", "the layer"])
def test_a_hub_kernel_from_kernelize_is_named(target):
    layer = tiny_layer()
    if target != "the layer" and not hasattr(modeling_qwen3_5, target):
        pytest.skip(f"this transformers has no {target}")
    kernelize_with(layer, layer if target == "the layer" else getattr(modeling_qwen3_5, target))
    with pytest.raises(HubKernelRan):  # the layer's calls really reach it
        layer(torch.randn(1, 4, layer.hidden_size))
    labels = deltanet_kernels(layer)
    if target == "the layer":
        assert set(labels.values()) == {f"{HUB}, in place of the whole Qwen3_5GatedDeltaNet"}
    elif target == "causal_conv1d_forward":
        assert {labels[n] for n in CONV} == {f"{HUB}, in place of causal_conv1d_forward"}
        assert labels["torch_chunk_gated_delta_rule"] == TORCH_FALLBACK
    else:
        assert labels[target] == HUB and {labels[n] for n in CONV} == {TORCH_FALLBACK}
    both = deltanet_kernels(torch.nn.ModuleList([layer, tiny_layer()]))  # another layer keeps its own copies
    for name, label in labels.items():
        assert both[name] == (label if label == TORCH_FALLBACK else f"differs between layers: {label}; {TORCH_FALLBACK}")


@needs_kernels
def test_a_forward_replaced_by_anything_else_is_not_called_the_torch_fallback():
    layer = tiny_layer()
    copy = next(f for f in layer._kernel_funcs.values()
                if type(f) is type(modeling_qwen3_5.torch_chunk_gated_delta_rule))
    copy.forward = lambda *args, **kwargs: None
    assert deltanet_kernels(layer)["torch_chunk_gated_delta_rule"].startswith(UNREADABLE)
    layer._hf_hook, layer._old_forward = object(), layer.forward  # accelerate keeps the layer's own forward
    layer.forward = lambda *args, **kwargs: None
    assert deltanet_kernels(layer)["causal_conv1d_fn"] == TORCH_FALLBACK
