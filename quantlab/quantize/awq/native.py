"""quantlab's own AWQ engine: streams one decoder layer at a time from the source shards.

Peak host memory is about one layer, the calibration activations, and one output shard; the
whole model is never in memory. Per layer:
1. load its tensors from the shards onto the device;
2. run the calibration activations through it (float), capturing the Linears' inputs;
3. search and fold the AWQ scales (mappings.py), then the clipping (search.py);
4. quantize, pack as AWQ GEMM (pack.py) and write; the float outputs feed the next layer.
Everything outside the decoder layers (embeddings, final norm, lm_head, a vision tower) is copied. The MTP head
(mtp.*) is the build's to copy, unless the recipe quantizes it too: then it goes through the same steps after the
last layer (mtp.py).

Without calibration (synthetic weights) it packs round-to-nearest weights in the same format: the
checkpoint then costs the same memory and runs at the same speed as a calibrated one.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import defaultdict

import torch
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from quantlab.architecture import MTP_PREFIX, UNQUANTIZED_ROLES, role_of, tensor_class
from quantlab.errors import QuantlabError
from quantlab.quantize.awq.engine import AwqJob, AwqOutcome, AwqParams
from quantlab.quantize.awq.mappings import AWQ_ARCHITECTURES, NO_CLIP, AwqMapping
from quantlab.quantize.awq.pack import pack_gemm
from quantlab.quantize.awq.search import GRID, apply_clip, search_clip, search_scales
from quantlab.quantize.awq.shards import ShardReader, ShardWriter
from quantlab.quantize.groupwise import quantize_rows, scale_columns


class _StopForward(Exception):
    pass


class QuantlabEngine:
    name = "quantlab"

    def check(self, params: AwqParams, config: PretrainedConfig) -> None:
        if params.model_class not in AWQ_ARCHITECTURES:
            raise QuantlabError(
                f"quantization.engine quantlab: no AWQ mappings for {params.model_class} (model_type "
                f"{getattr(config, 'model_type', '?')}); it knows {', '.join(sorted(AWQ_ARCHITECTURES))}. "
                "Add the class to quantlab/quantize/awq/mappings.py"
            )

    def quantize(self, job: AwqJob) -> AwqOutcome:
        from quantlab.hf_loading import select_variant

        auto_class = select_variant(job.config, "full" if hasattr(job.config, "text_config") else "text")[1]
        with torch.device("meta"):
            model = auto_class.from_config(job.config, dtype=job.dtype)
        arch = AWQ_ARCHITECTURES[type(model).__name__]
        layers = model.get_submodule(arch.decoder_layers)
        reader = ShardReader(job.source) if job.source is not None else None
        if reader is not None:
            _check_names(model, reader)
        if job.params.mtp:  # before any layer: a head that cannot be quantized is one line, not a late failure
            from quantlab.quantize.awq.mtp import check_mtp_head

            check_mtp_head(str(job.source), job.config, reader and {n: t.shape for n, t in reader.tensors.items()},
                           job.params.group_size, synthetic=reader is None)
        writer = ShardWriter(job.out, job.max_shard_bytes)
        quantized: list[str] = []
        with _seeded(job.seed, job.device):
            hidden, layer_kwargs = (None, None)
            if job.calibration is not None:
                hidden, layer_kwargs = _first_layer_inputs(model, arch.decoder_layers, reader, job)
            bar = tqdm(range(len(layers)), desc="AWQ layers", unit="layer", disable=not job.progress)
            for index in bar:
                prefix = f"{arch.decoder_layers}.{index}"
                layer = _materialize(model, prefix, reader, job)
                names, hidden = _quantize_layer(model, layer, prefix, arch.mappings, job, hidden,
                                                layer_kwargs[index] if layer_kwargs else None, writer)
                quantized += names
                layers[index] = layer.to("meta")
                del layer
                _empty_cache(job.device)
                if job.on_layer is not None:
                    job.on_layer(index)
            mtp_note = None
            if job.params.mtp:  # after the last layer: its float outputs are the MTP head's hidden input
                from quantlab.quantize.awq.mtp import LayerSteps, quantize_mtp

                mtp_names, mtp_note = quantize_mtp(model, arch.decoder_layers, reader, job, hidden,
                                                   LayerSteps(_quantize_layer, _fold, _materialize, _empty_cache))
                quantized += mtp_names
            _write_rest(model, arch.decoder_layers, reader, job, writer)
        writer.finish()
        notes = () if job.calibration is not None else (
            ("synthetic weights, " if reader is None else "")
            + "round-to-nearest packed in the AWQ GEMM format (no calibration): the same memory and speed as a "
            "calibrated AWQ build, not its quality",
        )
        return AwqOutcome(self.name, tuple(quantized), notes + ((mtp_note,) if mtp_note else ()))


# ---- loading -----------------------------------------------------------------------------------------

def _check_names(model: torch.nn.Module, reader: ShardReader) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - reader.names())
    if missing:
        raise QuantlabError(
            f"{reader.folder}: {len(missing)} tensor(s) that {type(model).__name__} expects are not in the checkpoint, "
            f"e.g. {missing[0]}. Is the folder a {type(model).__name__} checkpoint in transformers' layout?"
        )


def _materialize(model: torch.nn.Module, prefix: str, reader: ShardReader | None, job: AwqJob) -> torch.nn.Module:
    """The module at `prefix`, on the device with real tensors: from the shards, or freshly initialised."""
    module = model.get_submodule(prefix)
    if reader is None:
        module.to_empty(device=job.device)
        for sub in module.modules():
            model._init_weights(sub)
        return module.to(job.dtype)
    for name, tensor in module.state_dict(keep_vars=True).items():
        value = reader.get(f"{prefix}.{name}", job.device, job.dtype if tensor.is_floating_point() else None)
        set_module_tensor_to_device(module, name, job.device, value=value)
    return module


def _first_layer_inputs(model, layers_path: str, reader, job: AwqJob):
    """Embeddings of the calibration windows, chunked, and each layer's keyword arguments per chunk
    (position embeddings and attention masks), taken from the model's own forward."""
    text_model = model.get_submodule(layers_path.rsplit(".", 1)[0])
    embed_name = next(n for n, m in model.named_modules() if m is text_model.get_input_embeddings())
    _materialize(model, embed_name, reader, job)
    rotary = text_model.rotary_emb
    text_model.rotary_emb = type(rotary)(config=model.config.get_text_config()).to(job.device)  # meta has no inv_freq
    layers = text_model.layers
    captured: list[dict] = []

    class Capture(torch.nn.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def forward(self, hidden_states, **kwargs):
            captured[-1]["kwargs"].append(kwargs)
            if self.index == 0:
                captured[-1]["hidden"] = hidden_states
            if self.index == len(layers) - 1:
                raise _StopForward
            return hidden_states

    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = Capture(i)
    try:
        for chunk in job.calibration.split(job.params.batch_size):
            captured.append({"kwargs": []})
            with torch.no_grad(), contextlib.suppress(_StopForward):
                text_model(input_ids=chunk.to(job.device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        text_model.rotary_emb = rotary
        model.get_submodule(embed_name).to("meta")  # written later with the other tensors; not kept meanwhile
    hidden = [c["hidden"] for c in captured]
    per_layer = [[c["kwargs"][i] for c in captured] for i in range(len(layers))]
    return hidden, per_layer


def _write_rest(model, layers_path: str, reader, job: AwqJob, writer: ShardWriter) -> None:
    """Every tensor outside the decoder layers, unquantized (mtp.* is the build's to copy)."""
    inside = f"{layers_path}."
    if reader is not None:
        for name in sorted(reader.names()):
            if not name.startswith(inside) and not name.startswith(MTP_PREFIX):
                writer.add(name, reader.get(name))
        return
    for name, module in model.named_modules():
        direct = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        persistent = {n for n in direct if n not in module._non_persistent_buffers_set}
        if not persistent or name.startswith(inside) or f"{name}.".startswith(inside):
            continue
        module.to_empty(device=job.device, recurse=False)
        model._init_weights(module)
        for tensor_name in sorted(persistent):
            tensor = getattr(module, tensor_name)
            writer.add(f"{name}.{tensor_name}", tensor.to(job.dtype) if tensor.is_floating_point() else tensor)
        module.to_empty(device="meta", recurse=False)


# ---- one layer ---------------------------------------------------------------------------------------

def _quantize_layer(model, layer, prefix: str, mappings: tuple[AwqMapping, ...], job: AwqJob, hidden, kwargs,
                    writer: ShardWriter, linears: dict[str, torch.nn.Linear] | None = None):
    """Search, fold, clip, quantize and write one decoder layer; `linears`: the ones to quantize (default: those
    the skip rules and skip_classes leave to quantization)."""
    qc = job.params
    linears = _quantized_linears(model, layer, prefix, qc) if linears is None else linears
    outputs = None
    if hidden is not None:
        inputs, calls, outputs = _capture(layer, hidden, kwargs, linears, mappings)
        with torch.no_grad():
            for mapping in mappings:
                _balance(layer, mapping, linears, inputs, calls, qc, job.search_grid or GRID)
                _empty_cache(job.device)
            if qc.clip:
                for name, fc in linears.items():
                    if not name.endswith(NO_CLIP):
                        factor = search_clip(fc.weight.data, inputs[name], qc.bits, qc.group_size, qc.zero_point,
                                             job.search_grid or GRID)
                        apply_clip(fc, factor, qc.group_size, qc.zero_point)
        del inputs, calls
    for name, tensor in layer.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if module_name in linears and leaf == "weight":
            q = quantize_rows(tensor, qc.bits, qc.group_size, qc.zero_point)
            for suffix, packed in pack_gemm(q, job.dtype).items():
                writer.add(f"{prefix}.{module_name}.{suffix}", packed)
        else:
            writer.add(f"{prefix}.{name}", tensor)
    return [f"{prefix}.{n}" for n in linears], outputs


def _quantized_linears(model, layer, prefix: str, qc: AwqParams) -> dict[str, torch.nn.Linear]:
    """The layer's Linears that are quantized: not kept by the rules (UNQUANTIZED_ROLES) nor by skip_classes."""
    skipped, class_name = UNQUANTIZED_ROLES["awq"], type(model).__name__
    return {
        name: m for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and role_of(class_name, f"{prefix}.{name}.weight") not in skipped
        and tensor_class(f"{prefix}.{name}") not in qc.skip_classes
    }


def _capture(layer, hidden, kwargs, linears, mappings):
    """Run the float layer on every chunk; keep each quantized Linear's input and each inspected
    module's call, and return the layer outputs (the next layer's inputs)."""
    inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    calls: dict[str, list[tuple[tuple, dict]]] = defaultdict(list)
    hooks = []
    for name, fc in linears.items():
        hooks.append(fc.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0])))
    mappings = [m for m in mappings if any(name in linears for name in m.balance)]  # no search, nothing to keep
    smooth_inputs = {m.balance[0] for m in mappings}
    for name in smooth_inputs - set(linears):
        if _has(layer, name):  # balanced but not quantized (in_proj_a): its input still feeds the search
            fc = layer.get_submodule(name)
            hooks.append(fc.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0])))
    for name in {m.inspect for m in mappings if m.inspect and _has(layer, m.inspect)}:
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(
            lambda m, args, kw, name=name: calls[name].append((args, kw)), with_kwargs=True))
    try:
        with torch.no_grad():
            outputs = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, calls, outputs


def _balance(layer, mapping: AwqMapping, linears, inputs, calls, qc: AwqParams, grid: int = GRID) -> None:
    present = [name for name in mapping.balance if _has(layer, name)]
    if not present or not _has(layer, mapping.smooth):
        return
    smooth = layer.get_submodule(mapping.smooth)
    balance = [layer.get_submodule(name) for name in present]
    if isinstance(smooth, torch.nn.Linear) and smooth.out_features != balance[0].in_features:
        return
    searched = [layer.get_submodule(n) for n in present if n in linears]
    if not searched:
        return
    x = inputs[present[0]]
    if mapping.inspect and _has(layer, mapping.inspect):
        inspect = layer.get_submodule(mapping.inspect)

        def run():  # one chunk at a time: a candidate's outputs are compared as they come
            return (_first(inspect(*args, **kw)) for args, kw in calls[mapping.inspect])
    else:
        def run():
            return (torch.cat([fc(chunk) for fc in searched], dim=-1) for chunk in x)

    scales, _ = search_scales(searched, x, run, qc.bits, qc.group_size, qc.zero_point, grid)
    _fold(smooth, balance, scales)
    divided = set()
    for name in present:
        for tensor in inputs.get(name, []):
            if id(tensor) not in divided:  # q/k/v share one input tensor: divide it once
                tensor.div_(scales.to(tensor.dtype))
                divided.add(id(tensor))


def _fold(smooth: torch.nn.Module, balance: list[torch.nn.Linear], scales: torch.Tensor) -> None:
    """smooth /= s and balance *= s: the float function is unchanged."""
    if isinstance(smooth, torch.nn.Linear):
        scale_columns(smooth.weight.data.t(), 1 / scales)  # its output rows
        if smooth.bias is not None:
            smooth.bias.data = (smooth.bias.data.float() / scales).to(smooth.bias.dtype)
    elif _adds_one(smooth):  # Qwen3.5's RMSNorm multiplies by (1 + weight)
        smooth.weight.data = ((1 + smooth.weight.data.float()) / scales - 1).to(smooth.weight.dtype)
    else:
        smooth.weight.data = (smooth.weight.data.float() / scales).to(smooth.weight.dtype)
        if getattr(smooth, "bias", None) is not None:
            smooth.bias.data = (smooth.bias.data.float() / scales).to(smooth.bias.dtype)
    for fc in balance:
        scale_columns(fc.weight.data, scales)


def _adds_one(norm: torch.nn.Module) -> bool:
    """Whether a norm scales by (1 + weight): probed, with its weight set to zero, on a constant input."""
    weight = norm.weight.data
    saved = weight.clone()
    try:
        weight.zero_()
        with torch.no_grad():
            out = norm(torch.ones(1, weight.shape[0], device=weight.device, dtype=weight.dtype))
    finally:
        weight.copy_(saved)
    return bool(out.abs().sum() > 0)


def _has(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _empty_cache(device: torch.device) -> None:
    """Give a finished layer's memory back: to the CUDA driver, and to the OS, since glibc keeps freed
    heap pages (tens of MB per layer here) in the process, where they would pile up as RSS."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass

