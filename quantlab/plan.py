"""The run plan: every cross-field check, and a dry run on the meta device, before weights load."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from transformers import PretrainedConfig

from quantlab.errors import QuantlabError
from quantlab.quantize.handlers import handler_for
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

    @property
    def recipe(self):
        return self.loaded.recipe


def make_plan(loaded: LoadedRecipe, for_this_machine: bool = True) -> RunPlan:
    """`for_this_machine=False` (validate) skips the checks that depend on the local GPU and RAM."""
    recipe = loaded.recipe
    device = resolve_device(recipe.model.device) if for_this_machine else _nominal_device(recipe.model.device)
    resolved = resolve_config(recipe.model)
    config, auto_class = select_variant(resolved.config, recipe.model.variant)
    handler = handler_for(recipe.quantization)
    handler.check(recipe.quantization, config)
    _check_context(config, recipe.measure.contexts, recipe.measure.new_tokens)
    parameters = meta_parameter_count(config, auto_class)
    weight_bytes = parameters * DTYPES[recipe.model.dtype].itemsize
    notes = list(resolved.notes)
    if for_this_machine:
        notes += _memory_check(device, weight_bytes)
    points = tuple((c, b) for b in recipe.measure.batch_sizes for c in sorted(recipe.measure.contexts))
    return RunPlan(
        loaded=loaded,
        resolved=resolved,
        device=device,
        model_class=model_class_name(config, auto_class),
        parameters=parameters,
        weight_bytes=weight_bytes,
        method_label=handler.label(recipe.quantization, recipe.model.dtype),
        points=points,
        notes=tuple(notes),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantlabError(
                f"model.device is '{name}' but torch {torch.__version__} sees no CUDA GPU here. "
                "Use device: auto (CPU when there is no GPU) or run on a GPU machine."
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise QuantlabError(f"model.device is '{name}' but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", index)
    return device


def _nominal_device(name: str) -> torch.device:
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu" if name == "auto" else name)


def meta_parameter_count(config: PretrainedConfig, auto_class: type) -> int:
    """Instantiate on the meta device: shapes only, no memory, a fraction of a second at 27B."""
    with torch.device("meta"):
        model = auto_class.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _check_context(config: PretrainedConfig, contexts: list[int], new_tokens: int) -> None:
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    if limit is None:
        return
    too_long = [c for c in contexts if c + new_tokens > limit]
    if too_long:
        raise QuantlabError(
            f"measure.contexts: {too_long} + new_tokens {new_tokens} exceed the model's "
            f"max_position_embeddings ({limit:,})"
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
