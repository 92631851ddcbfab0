"""One model, ready to estimate: its config, every tensor, and its hybrid shape.

`--model` accepts a shipped config name (qwen3.6-27b, qwen3.5-397b-a17b), `bundled`, qwen3.6-27b-cache-shapes
(quantlab/cache_shapes.py), a config.json or its folder, or a Hub id (owner/name: the HF cache, quantlab's shipped
copy, then the Hub), all through quantlab.sources.resolve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from quantlab.errors import QuantlabError
from quantlab.estimate.config_check import check_config_values, check_parameter_count
from quantlab.estimate.hybrid import HybridShape, check_fields, hybrid_shape
from quantlab.estimate.inventory import ModelInventory, estimator_class, model_inventory, text_config_of
from quantlab.cache_shapes import NAME as CACHE_SHAPES
from quantlab.known_models import KNOWN_MODELS
from quantlab.recipe import ModelSpec
from quantlab.sources import resolve


NAMED_CONFIGS = (*KNOWN_MODELS, CACHE_SHAPES, "bundled")  # what --model takes by name


@dataclass(frozen=True)
class EstimationModel:
    name: str
    location: str
    inventory: ModelInventory
    shape: HybridShape
    notes: tuple[str, ...] = ()
    text_model: tuple | None = None  # (config, auto class) of the text model as from_pretrained would build it


    @property
    def has_vision(self) -> bool:
        return any(g.role == "vision" for g in self.inventory.groups)


def read_estimation_model(model: str) -> EstimationModel:
    spec = model_spec(model)
    try:
        resolved = resolve(spec)
    except (ValueError, TypeError, KeyError) as exc:
        raise QuantlabError(f"{model}: not a usable config ({type(exc).__name__}: {_first_line(exc)})") from None
    except QuantlabError as exc:  # the recipe's words for the source; here it is the command line's
        raise QuantlabError(str(exc).replace("model.config: ", "--model ", 1)) from None
    estimator_class(resolved.config)  # an unknown architecture is named before any missing field
    raw = _raw_config(model)
    if raw is not None:
        check_fields(raw, model)
    check_config_values(resolved.config, model[:200])  # before any tensor is built from the sizes
    shape = hybrid_shape(text_config_of(resolved.config))
    inventory = _inventory(resolved.config, model)
    check_parameter_count(inventory.parameters(), model[:200])
    return EstimationModel(resolved.name, resolved.location, inventory, shape, resolved.notes, resolved.variant())


def _inventory(config, model: str) -> ModelInventory:
    try:
        return model_inventory(config)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:  # sizes the checks let by
        raise QuantlabError(f"{model[:200]}: transformers cannot build the model from it "
                            f"({type(exc).__name__}: {_first_line(exc)})") from None


def model_spec(model: str) -> ModelSpec:
    try:
        if model in NAMED_CONFIGS:
            return ModelSpec(source="synthetic", config=model)
        path = Path(model).expanduser()
        if path.suffix == ".gguf" and path.is_file():  # its header stands for the config
            return ModelSpec(source="gguf", path=str(path))
        if path.exists():
            return ModelSpec(source="synthetic", config=str(path))
        if model.count("/") == 1 and not model.startswith((".", "/", "~")):
            return ModelSpec(source="hub", id=model)
    except (ValidationError, RuntimeError) as exc:  # not a valid path or Hub id; ~user of an unknown user
        why = exc.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(exc, ValidationError) else str(exc)
        raise QuantlabError(f"--model {model[:200]!r}: {why[:300]}") from None
    known = ", ".join(NAMED_CONFIGS)
    raise QuantlabError(
        f"--model '{model[:200]}': not a shipped config ({known}), not an existing config.json or folder, "
        "and not a Hub id (owner/name)"
    )


def _raw_config(model: str) -> dict | None:
    """The config.json as written, when --model names a file or folder (shipped configs are complete)."""
    if model in NAMED_CONFIGS or not Path(model).expanduser().exists() or model.endswith(".gguf"):
        return None
    path = Path(model).expanduser()
    path = path if path.name == "config.json" else path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # resolve gives the precise error
    return raw if isinstance(raw, dict) else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
