"""The run plan: every cross-field check, and a dry run on the meta device, before weights load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import PretrainedConfig

from quantlab.checkpoint import check_config_sizes, check_folder, compare_with_model, shard_files
from quantlab.errors import QuantlabError, summary
from quantlab.outputs import check_measurements_folder
from quantlab.quality.plan import QualityPlan, plan_quality
from quantlab.quantize.handlers import handler_for
from quantlab.quantize.prequantized import checkpoint_method
from quantlab.recipe import LoadedRecipe
from quantlab.sources import DTYPES, ResolvedConfig, model_class_name, resolve_config, select_variant

# Headroom on top of the weights for a CPU run: activations, allocator slack, Python.
CPU_HEADROOM = 1.2


@dataclass(frozen=True)
class RunPlan:
    loaded: LoadedRecipe
    resolved: ResolvedConfig
    device: torch.device
    model_class: str
    parameters: int
    weight_bytes: int  # before quantization, in the recipe's dtype
    method_label: str
    points: tuple[tuple[int, int], ...]  # (context, batch), in measurement order
    notes: tuple[str, ...]
    quality: QualityPlan | None = None  # the recipe's quality section, checked (quantlab/quality/plan.py)
    # What records call the method: the recipe's, or the checkpoint's when it is already quantized.
    method_name: str = "none"
    method_params: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe(self):
        return self.loaded.recipe


def make_plan(loaded: LoadedRecipe, for_this_machine: bool = True, records_to: str | Path | None = None) -> RunPlan:
    """`for_this_machine=False` (validate) skips the checks that depend on the local GPU, RAM and files written;
    `records_to`: the measurements folder the run will write, checked before any weights load."""
    recipe = loaded.recipe
    device = resolve_device(recipe.model.device) if for_this_machine else _nominal_device(recipe.model.device)
    if for_this_machine and records_to is not None:
        check_measurements_folder(records_to)
    resolved = resolve_config(recipe.model)
    config, auto_class = select_variant(resolved.config, recipe.model.variant)
    check_config_sizes(config, config_location(recipe.model, resolved))
    handler = handler_for(recipe.quantization)
    handler.check(recipe.quantization, config)
    prequantized = _prequantized(recipe, resolved)
    _check_awq_kernel(recipe.model.awq_kernel, recipe.quantization.method, prequantized)
    model = meta_model(config, auto_class, where=config_location(recipe.model, resolved))
    checkpoint_notes = () if prequantized else _check_checkpoint(recipe.model, resolved, model)
    source_notes = _check_source(handler, recipe, resolved)
    _check_context(config, recipe.measure.contexts, recipe.measure.new_tokens)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    weight_bytes = parameters * DTYPES[recipe.model.dtype].itemsize
    notes = list(resolved.notes) + list(checkpoint_notes) + list(source_notes)
    if for_this_machine:
        notes += _memory_check(device, weight_bytes)
    quality = plan_quality(recipe, resolved, config, device, weight_bytes, for_this_machine,
                           prequantized.label if prequantized else None)
    notes += quality.notes if quality else ()
    points = tuple((c, b) for b in recipe.measure.batch_sizes for c in sorted(recipe.measure.contexts))
    return RunPlan(
        loaded=loaded,
        resolved=resolved,
        device=device,
        model_class=model_class_name(config, auto_class),
        parameters=parameters,
        weight_bytes=weight_bytes,
        method_label=prequantized.label if prequantized else handler.label(recipe.quantization, recipe.model.dtype),
        points=points,
        notes=tuple(notes),
        quality=quality,
        method_name=prequantized.name if prequantized else recipe.quantization.method,
        method_params=prequantized.params if prequantized else recipe.quantization.model_dump(),
    )


def _prequantized(recipe, resolved: ResolvedConfig):
    """The checkpoint's own method when its config.json has a quantization_config (e.g. a quantlab build)."""
    if recipe.model.source == "synthetic":
        return None  # random weights from a quantized checkpoint's config are created unquantized
    found = checkpoint_method(resolved.config, resolved.location if recipe.model.source == "local" else None)
    if found is not None and recipe.quantization.method != "none":
        raise QuantlabError(
            f"quantization.method {recipe.quantization.method}: {resolved.location} is already quantized "
            f"({found.label}, quant_method {found.quant_method}); use quantization: {{method: none}} to measure it as it is"
        )
    return found


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


def _check_source(handler, recipe, resolved: ResolvedConfig) -> tuple[str, ...]:
    """Method checks that need the source's files but not its weights (AWQ: the calibration text)."""
    hook = getattr(handler, "check_source", None)
    if hook is None:
        return ()
    location = resolved.location if recipe.model.source in ("bundled", "local") else _cached_folder(recipe.model)
    return tuple(hook(recipe.quantization, recipe.model, location))


def _cached_folder(spec) -> str | None:
    if spec.source != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.id, "tokenizer.json", revision=spec.revision)
    return str(Path(cached).parent) if isinstance(cached, str) else None


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


def meta_model(config: PretrainedConfig, auto_class: type | None = None, where: str = "the config") -> torch.nn.Module:
    """Instantiate on the meta device: shapes only, no memory, a fraction of a second at 27B."""
    if auto_class is None:
        auto_class = select_variant(config, "full" if hasattr(config, "text_config") else "text")[1]
    check_config_sizes(config, where)
    try:
        with torch.device("meta"):
            return auto_class.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a user's config that transformers cannot build: one message
        raise QuantlabError(f"{where}: transformers cannot build the model from it ({summary(exc)})") from None


def config_location(spec, resolved: ResolvedConfig) -> str:
    """The config file a plan error names."""
    location = Path(resolved.location)
    if spec.source == "hub" or not location.exists():
        return f"the config of {resolved.location}"  # a Hub id, or a config shipped with quantlab
    return str(location if location.name == "config.json" else location / "config.json")


def _check_checkpoint(spec, resolved: ResolvedConfig, model: torch.nn.Module) -> tuple[str, ...]:
    """The shard headers of a checkpoint on this machine against the model its config describes."""
    if spec.source == "synthetic":
        return ()
    folder = Path(resolved.location) if spec.source in ("bundled", "local") else _cached_snapshot(spec)
    if folder is None:
        return (f"{spec.id}: the weights are not (all) in the Hugging Face cache yet; their tensors are checked "
                "against the config as they load",)
    check_folder(folder, progress=False)
    compare_with_model(folder, model)
    return ()


def _cached_snapshot(spec) -> Path | None:
    """The Hub snapshot folder, when its config and every shard are in the cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.id, "config.json", revision=spec.revision)
    if not isinstance(cached, str):
        return None
    folder = Path(cached).parent
    try:
        shard_files(folder)
    except QuantlabError:
        return None  # shards still to download
    return folder


def meta_parameter_count(config: PretrainedConfig, auto_class: type, where: str = "the config") -> int:
    return sum(p.numel() for p in meta_model(config, auto_class, where).parameters())


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
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if weight_bytes > total:
            return [f"weights ({weight_bytes / 1e9:.1f} GB) exceed {device}'s {total / 1e9:.1f} GB: expect OOM at load"]
        return []
    available = psutil.virtual_memory().available
    if weight_bytes * CPU_HEADROOM > available:
        raise QuantlabError(
            f"the weights need {weight_bytes / 1e9:.1f} GB (+20% headroom) of host RAM but only "
            f"{available / 1e9:.1f} GB is available. Use a smaller model, a GPU machine, or the bundled model."
        )
    return []
