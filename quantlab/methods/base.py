"""A quantization method, whole: its recipe config and every hook quantlab calls, with defaults here.

A method is one module in quantlab/methods/: a config class (pydantic, its `method` literal is the recipe's
`quantization.method`) and a Method subclass decorated with `@register`, which files it by its config type,
as torchao registers its handlers. quantlab/methods/__init__.py imports the modules: adding a method is one
module and one line there. Hooks receive what they work on (the model source, the loaded model, a record's
parameters); a method imports nothing of the plan, the run or the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel

from quantlab.errors import QuantlabError
from quantlab.fields import STRICT

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from quantlab.quantize.skips import SkipPlan
    from quantlab.model_spec import ModelSpec
    from quantlab.sources import ModelSource

_REGISTRY: dict[type, "Method"] = {}


class MethodConfig(BaseModel):
    """Recipe-facing configuration of a method: data only. Subclasses set `method: Literal[...]`."""

    model_config = STRICT


@dataclass(frozen=True)
class CardFacts:
    """What a build's model card says about the method."""

    by: str  # who quantized it, e.g. "bitsandbytes" ("" when quantlab's own engine did)
    loading_needs: str  # what loading the build needs, e.g. "needs bitsandbytes>=0.46.1"
    skip_key: str  # the quantization_config key of its skip list, e.g. "llm_int8_skip_modules"
    tags: tuple[str, ...]  # Hub tags


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What an engine that writes a checkpoint reports: its name, the Linears it quantized, notes, calibration."""

    engine: str
    quantized: tuple[str, ...]
    notes: tuple[str, ...] = ()
    calibration_label: str | None = None
    calibration_description: dict | None = None


class Method:
    name: ClassVar[str]  # the recipe's quantization.method
    config: ClassVar[type[MethodConfig]]
    writes_checkpoint: ClassVar[bool] = False  # its engine writes a checkpoint from the source's files (AWQ)
    builds: ClassVar[bool] = False  # `quantlab build` makes community artifacts with it
    card: ClassVar[CardFacts | None] = None  # None: no model card (a method that is not built)
    artifact_file: ClassVar[str | None] = None  # its engine writes one file a runtime loads (GGUF), not a checkpoint
    makes: ClassVar[str] = "checkpoint"  # what a runtime loads of it: a checkpoint folder, or a "gguf" file
    measured_form: ClassVar[str] = "checkpoints"  # what it makes, said in errors ("GGUF files")
    # Quantized inside quantlab's process as transformers loads the model (bitsandbytes, RTN): nothing on disk that a
    # runtime in a process of its own (vLLM) could load; the reason is said in errors
    in_process: ClassVar[str | None] = None
    unquantized_hint: ClassVar[str] = ""  # how a recipe of this method names the unquantized model, said in errors
    # `quantlab sensitivity`: the option naming the levels a tensor class may be raised to (None: not swept)
    sensitivity_option: ClassVar[str | None] = None

    def label(self, qconfig: MethodConfig, dtype: str) -> str:
        """A short name for tables, e.g. 'BF16' or 'bnb nf4'."""
        raise NotImplementedError

    def check(self, qconfig: MethodConfig, source: ModelSource) -> None:
        """Cross-field checks against the model (its meta-device instance); raise QuantlabError. Before any load."""

    def check_model(self, qconfig: MethodConfig, model: ModelSpec) -> None:
        """The recipe's own checks of its model section against this method (raise ValueError), before any file
        is read: e.g. a method that converts a checkpoint's files refuses synthetic weights."""

    def check_source(self, qconfig: MethodConfig, source: ModelSource) -> tuple[str, ...]:
        """Checks that need the source's files but not its weights (AWQ: the calibration text); plan notes."""
        return ()

    def skip_rules(self, qconfig: MethodConfig, source: ModelSource) -> SkipPlan | None:
        """What stays unquantized, as the skip list the checkpoint's loaders read; None: nothing is skipped."""
        return None

    def load_kwargs(self, qconfig: MethodConfig, source: ModelSource) -> dict[str, Any]:
        """Extra from_pretrained arguments, for methods that quantize while real weights load."""
        return {}

    def apply(self, model: torch.nn.Module, qconfig: MethodConfig) -> torch.nn.Module:
        """Quantize a loaded model in place (or return a new one)."""
        return model

    def write_checkpoint(self, qconfig: MethodConfig, source: ModelSource, folder: Path, device: torch.device,
                         max_shard_bytes: int, progress: bool, echo: Callable[[str], None]) -> WrittenCheckpoint:
        """Engine methods: quantize the source's files into a checkpoint in `folder`, config.json included."""
        raise QuantlabError(f"quantization.method {self.name} quantizes a loaded model; it writes no checkpoint")

    def from_checkpoint(self, quantization_config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """(label, params) when a saved checkpoint's quantization_config is this method's; None otherwise."""
        return None

    def estimator_scheme(self, params: dict[str, Any], dtype: str) -> str | None:
        """The estimator's scheme for these parameters (quantlab/data/quant_schemes.yaml); None: it has none."""
        return None

    def scheme_config(self, scheme: str) -> MethodConfig | None:
        """The other way: this method's config that the estimator's scheme stands for; None: not this method's."""
        return None

    def as_loaded(self, qconfig: MethodConfig, config: Any, skip_patterns: tuple[str, ...]) -> tuple[Any, dict | None]:
        """The model config and from_pretrained's quantization_config as a run of `qconfig` loads the model (the
        multi-GPU estimate sizes accelerate's map with them). Default: the config as it is, none."""
        return config, None

    def card_rows(self, params: dict[str, Any]) -> list[tuple[str, object]]:
        """The model card's table of the method's parameters."""
        return [("method", self.name)]

    def card_tags(self, params: dict[str, Any]) -> list[str]:
        return list(self.card.tags) if self.card else []

    def serving_lines(self, mtp: bool, repo_hint: str) -> list[str]:
        """Model card lines on serving the build with other engines (vLLM)."""
        return []


def register(cls: type[Method]) -> type[Method]:
    """File a method by its config type (the class decorator every method module uses)."""
    _REGISTRY[cls.config] = cls()
    return cls


def registered() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def method_for(qconfig: MethodConfig) -> Method:
    return _REGISTRY[type(qconfig)]
