"""The run plan: every cross-field check, and a dry run on the meta device, before weights load."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from quantlab import fingerprint
from quantlab.checkpoint import check_config_sizes, folder_tensors
from quantlab.device_map import DeviceSplit, check_devices_visible, offered_memory, plan_split
from quantlab.errors import QuantlabError
from quantlab.outputs import check_measurements_folder
from quantlab.plan_quality import QualityPlan, plan_quality
from quantlab.checkpoint_formats import check_runnable, gptq_block_modules
from quantlab.methods import METHODS, CheckpointMethod, checkpoint_method, method_for, method_named
from quantlab.recipe import DTYPE_BYTES, LoadedRecipe
from quantlab.sources import GgufSource, ModelSource, model_class_name, resolve

OWN_FORMATS = ("awq", "bitsandbytes")  # the quant_methods quantlab's own methods read (their from_checkpoint)


@dataclass(frozen=True)
class RunPlan:
    loaded: LoadedRecipe
    source: ModelSource
    device: torch.device
    model_class: str
    parameters: int
    weight_bytes: int  # before quantization, in the recipe's dtype
    method_label: str
    points: tuple[tuple[int, int], ...]  # (context, batch), in measurement order
    notes: tuple[str, ...]
    quality: QualityPlan | None = None  # the recipe's quality section, checked (quantlab/plan_quality.py)
    # What records call the method: the recipe's, or the checkpoint's when it is already quantized.
    method_name: str = "none"
    method_params: dict[str, Any] = field(default_factory=dict)
    split: DeviceSplit | None = None  # a model split across devices (model.gpus / model.max_memory)

    @property
    def recipe(self):
        return self.loaded.recipe

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every device the model occupies: the split's, or the one device."""
        return tuple(torch.device(d) for d in self.split.devices) if self.split else (self.device,)


def make_plan(loaded: LoadedRecipe, for_this_machine: bool = True, records_to: str | Path | None = None) -> RunPlan:
    """`for_this_machine=False` (validate) skips the checks that depend on the local GPU, RAM and files written;
    `records_to`: the measurements folder the run will write, checked before any weights load."""
    recipe = loaded.recipe
    device = resolve_device(recipe.model.device) if for_this_machine else _nominal_device(recipe.model.device)
    if for_this_machine and recipe.model.split:
        _check_split_devices(recipe.model)  # before anything is read: the GPUs it names must be here
    if for_this_machine and records_to is not None:
        check_measurements_folder(records_to)
    source = resolve(recipe.model)
    config, auto_class = source.variant()
    check_config_sizes(config, source.config_file)
    method = method_for(recipe.quantization)
    method.check(recipe.quantization, source)
    prequantized = _prequantized(recipe, source)
    _check_awq_kernel(recipe.model.awq_kernel, recipe.quantization.method, prequantized)
    checkpoint_notes = () if prequantized else source.check_files()
    source_notes = method.check_source(recipe.quantization, source)
    _check_context(config, recipe.measure.contexts, recipe.measure.new_tokens)
    _check_speculative(recipe, source, config)
    parameters = sum(p.numel() for p in source.meta.parameters())
    weight_bytes = parameters * DTYPE_BYTES[recipe.model.dtype]
    if isinstance(source, GgufSource):  # the file's own tensors, as the header sizes them
        parameters, weight_bytes = source.header.parameters, source.header.tensor_bytes
    notes = list(source.notes) + list(checkpoint_notes) + list(source_notes) + list(prequantized.notes if prequantized else ())
    split = _split(recipe, source, method, config, auto_class, for_this_machine) if recipe.model.split else None
    if split is not None:
        device = torch.device(split.first_device)
        notes.append(f"split across {', '.join(split.devices)} by accelerate's {split.strategy} device map (computed "
                     "on the meta device, then given to from_pretrained as it is)")
        if source.synthetic and recipe.quantization.method != "none":
            notes.append(f"synthetic weights are created in {recipe.model.dtype} and quantized in place on the devices "
                         f"they were created on: the map is for the {recipe.model.dtype} model")
    elif recipe.model.split:
        notes.append("model.gpus: the device map is computed on the machine that runs it, from its GPUs' free memory")
    if for_this_machine and split is None:
        notes += _memory_check(device, weight_bytes)
    quality = plan_quality(recipe, source, config, device, weight_bytes, for_this_machine,
                           prequantized.label if prequantized else None)
    notes += quality.notes if quality else ()
    points = tuple((c, b) for b in recipe.measure.batch_sizes for c in sorted(recipe.measure.contexts))
    return RunPlan(
        loaded=loaded,
        source=source,
        device=device,
        model_class=model_class_name(config, auto_class),
        parameters=parameters,
        weight_bytes=weight_bytes,
        method_label=prequantized.label if prequantized else method.label(recipe.quantization, recipe.model.dtype),
        points=points,
        notes=tuple(notes),
        quality=quality,
        method_name=prequantized.name if prequantized else recipe.quantization.method,
        method_params=prequantized.params if prequantized else recipe.quantization.model_dump(),
        split=split,
    )


def _check_split_devices(spec) -> None:
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.gpus is not None:
        check_devices_visible([f"cuda:{i}" for i in range(spec.gpus)], visible, f"model.gpus: {spec.gpus}")
    else:
        check_devices_visible(spec.max_memory, visible, "model.max_memory")


def _split(recipe, source: ModelSource, method, config, auto_class, for_this_machine: bool) -> DeviceSplit | None:
    """accelerate's device map for the model as it loads (bitsandbytes' layers sized by its quantizer);
    None for `gpus: N` where there are no GPUs to ask (validate)."""
    spec = recipe.model
    free = (lambda i: torch.cuda.mem_get_info(i)[0]) if for_this_machine else None
    offered = offered_memory(spec.max_memory, spec.gpus, free)
    if offered is None:
        return None
    # synthetic weights are created unquantized and quantized in place, on the devices the map gave them
    load_kwargs = {} if source.synthetic else method.load_kwargs(recipe.quantization, source)
    quantization_config = load_kwargs.get("quantization_config")
    try:
        return plan_split(config, auto_class, getattr(torch, spec.dtype), offered, quantization_config)
    except (ImportError, ValueError, RuntimeError) as exc:
        raise QuantlabError(f"model.max_memory: the device map could not be computed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None


def _prequantized(recipe, source: ModelSource):
    """The checkpoint's own method when its config.json has a quantization_config (e.g. a quantlab build)."""
    if source.synthetic:
        return None  # random weights from a quantized checkpoint's config are created unquantized
    if isinstance(source, GgufSource):
        label, params = method_named("gguf").from_gguf(source.header)
        return CheckpointMethod("gguf", label, params, "gguf")
    found = checkpoint_method(source.config, source.files())
    if found is not None and found.name not in METHODS:  # a format quantlab did not write: can this runtime run it?
        check_runnable(_quantization_config(source.config), source.location, source.files(), recipe.measure.runtime,
                       OWN_FORMATS)
        modules = gptq_block_modules(source.config, source.files()) if recipe.measure.runtime == "transformers" else None
        if modules:
            found = replace(found, notes=(f"GPTQ: the checkpoint does not say which Linears of its blocks are quantized "
                                          f"(modules_in_block_to_quantize), and transformers would convert them all; "
                                          f"quantlab gives it the {len(modules)} its shards hold: {', '.join(modules)}",))
    if found is not None and recipe.measure.runtime == "transformers":
        _check_transformers_reads(_quantization_config(source.config), source.location)
    if found is not None and recipe.quantization.method != "none":
        raise QuantlabError(
            f"quantization.method {recipe.quantization.method}: {source.location} is already quantized "
            f"({found.label}, quant_method {found.quant_method}); use quantization: {{method: none}} to measure it as it is"
        )
    return found


def _check_transformers_reads(qc: dict, where: str) -> None:
    """transformers' own parser of quantization configs, before any load: a config it refuses (an AWQ config whose
    format is GPTQ's, say) is one line here, not a traceback after the weights start loading."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        AutoQuantizationConfig.from_dict(dict(qc))
    except (ValueError, TypeError, KeyError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise QuantlabError(f"{where}: transformers cannot read its quantization_config ({why})") from None


def _quantization_config(config) -> dict:
    qc = getattr(config, "quantization_config", None)
    return qc if isinstance(qc, dict) else qc.to_dict()


def _check_awq_kernel(kernel: str | None, method: str, prequantized) -> None:
    if kernel is None:
        return
    if method != "awq" and (prequantized is None or prequantized.quant_method != "awq"):
        raise QuantlabError(
            f"model.awq_kernel {kernel!r}: only AWQ checkpoints take a kernel choice (quantization.method awq, or a "
            "checkpoint whose quantization_config says awq); remove it"
        )
    from transformers.utils.quantization_config import AwqBackend

    allowed = [b.value for b in AwqBackend]
    if kernel not in allowed:
        raise QuantlabError(f"model.awq_kernel {kernel!r}: not an AWQ kernel transformers knows; allowed: {', '.join(allowed)}")


def resolve_device(name: str, what: str = "model.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantlabError(
                f"{what} is '{name}' but torch {torch.__version__} sees no CUDA GPU here. "
                "Use device: auto (CPU when there is no GPU) or run on a GPU machine."
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise QuantlabError(f"{what} is '{name}' but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", index)
    return device


def _nominal_device(name: str) -> torch.device:
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu" if name == "auto" else name)


def _check_speculative(recipe, source: ModelSource, config: PretrainedConfig) -> None:
    """measure.speculative drafts with the model's MTP head: one line, before any weights load, where there is none."""
    if recipe.measure.speculative is None:
        return
    text = getattr(config, "text_config", None) or config
    what = f"measure.speculative: {source.name}"
    bundled_hint = "; the bundled model with its trained head is model: {source: bundled, mtp: true}" \
        if recipe.model.source == "bundled" else ""
    if int(getattr(text, "mtp_num_hidden_layers", 0) or 0) < 1:
        where = "its header has no MTP block: no nextn_predict_layers" if isinstance(source, GgufSource) \
            else "its config has no mtp_num_hidden_layers"
        raise QuantlabError(f"{what} has no MTP head ({where}){bundled_hint}")
    if source.synthetic:
        raise QuantlabError(f"{what}: synthetic weights have no MTP head (transformers builds the model without the "
                            "mtp.* tensors, so quantlab creates none)")
    folder = source.files()
    if folder is not None and not any(name.startswith("mtp.") for name in folder_tensors(folder)):
        raise QuantlabError(f"{what}: its config names an MTP head but {folder} has no mtp.* tensor (a checkpoint "
                            "saved by transformers has lost them: it drops mtp.* at load)")
    if recipe.quantization.method == "gguf" and not recipe.quantization.mtp:
        raise QuantlabError("measure.speculative: quantization.mtp: false writes the GGUF without its MTP head "
                            "(--no-mtp); set it true")


def _check_context(config: PretrainedConfig, contexts: list[int], new_tokens: int) -> None:
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    if limit is None:
        return
    too_long = [c for c in contexts if c + new_tokens > limit]
    if too_long:
        raise QuantlabError(
            f"measure.contexts: {too_long[:8]}{' ...' if len(too_long) > 8 else ''} + new_tokens {new_tokens} "
            f"exceed the model's max_position_embeddings ({limit:,})"
        )


def _memory_check(device: torch.device, weight_bytes: int) -> list[str]:
    short = fingerprint.memory_shortfall(device, weight_bytes)
    if short is None:
        return []
    if short[0] == "gpu":
        return [f"weights ({weight_bytes / 1e9:.1f} GB) exceed {device}'s {short[1] / 1e9:.1f} GB: expect OOM at load"]
    raise QuantlabError(
        f"the weights need {weight_bytes / 1e9:.1f} GB (+20% headroom) of host RAM but only "
        f"{short[1] / 1e9:.1f} GB is available. Use a smaller model, a GPU machine, or the bundled model."
    )
