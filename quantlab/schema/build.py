"""quantlab_build.json: what a build folder records about itself. Plain JSON, no torch imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantlab.errors import QuantlabError
from quantlab.schema.frozen import Frozen
from quantlab.schema.record import MethodRef, RecipeRef

MANIFEST_NAME = "quantlab_build.json"
GGUF_MANIFEST_NAME = "quantlab_gguf_build.json"  # a GGUF build's (quantlab/artifact/gguf_build.py)
CHECKSUMS_NAME = "SHA256SUMS"
FORMAT = "quantlab-build/1"


class BaseModelRef(Frozen):
    name: str  # display name, e.g. "Qwen3.6-27B" or "quantlab-bundled"
    source: str  # bundled | hub | local
    location: str
    revision: str | None = None
    hub_id: str | None = None  # the Hub repo of the base model, when known (the card's base_model)
    license: str | None = None
    variant: str
    dtype: str
    model_class: str


class ReferenceCheck(Frozen):
    """The build against its unquantized source on the same prompt: the source's greedy tokens, how many of
    them the build predicts when fed the source's sequence (teacher-forced top-1 agreement), and how many
    leading tokens its own greedy run shares. A broken build agrees on next to none."""

    model: str  # e.g. "the BF16 source"
    tokens: list[int]
    agreement: float  # share of the positions where the build's argmax is the source's greedy token
    common_prefix: int  # leading tokens the two free-running greedy generations share
    threshold: float  # the build was refused below this agreement


class GreedyCheck(Frozen):
    """A short greedy generation recorded after the build was reloaded; `verify` repeats it."""

    prompt: str
    prompt_ids: list[int]
    new_tokens: int
    tokens: list[int]  # the new tokens only
    text: str | None = None
    device: str
    auto_class: str  # AutoModelForCausalLM or AutoModelForImageTextToText
    reference: ReferenceCheck | None = None  # against the unquantized source (methods that write a checkpoint)
    reference_note: str | None = None  # why there is no reference comparison, when there is none


class Unquantized(Frozen):
    skip_modules: list[str]  # llm_int8_skip_modules, as written in config.json
    rule_patterns: list[str]  # from quantlab.architecture.UNQUANTIZED_ROLES
    extra_patterns: list[str]  # from the recipe's quantization.skip_classes and skip_modules
    kept_linears: list[str]  # Linear modules left unquantized
    quantized_linears: int


class QuantizeCost(Frozen):
    """What making the quantized checkpoint cost, measured around that step alone."""

    what: str  # the steps the figures cover
    device: str
    seconds: float  # wall time, CUDA-synchronised
    rss_start_bytes: int
    rss_peak_bytes: int  # host RSS, sampled
    gpu_allocated_peak_bytes: int | None = None  # torch allocator; None without a GPU (never 0)
    gpu_reserved_peak_bytes: int | None = None
    nvml_process_peak_bytes: int | None = None


class BuildManifest(Frozen):
    format: str = FORMAT
    name: str
    created_at: str
    quantlab: str
    git_commit: str | None = None
    recipe: RecipeRef
    base: BaseModelRef
    method: MethodRef
    unquantized: Unquantized
    mtp: dict[str, Any] | None = None  # tensors, bytes, file; None when the source had none
    greedy: GreedyCheck
    built_on: str  # hardware the build (and its greedy check) ran on
    record_ids: list[str] = []
    cost: QuantizeCost | None = None
    engine: dict[str, Any] | None = None  # engine-written methods (AWQ): engine name, calibration, notes


def write_manifest(folder: Path, manifest: BuildManifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1) + "\n", encoding="utf-8")


def is_gguf_build(folder: str | Path) -> bool:
    """A folder `quantlab build` made for the gguf method: its manifest says format gguf."""
    try:
        data = json.loads((Path(folder) / GGUF_MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "gguf"


def read_manifest(folder: str | Path) -> BuildManifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise QuantlabError(f"{folder}: not a quantlab build (no {MANIFEST_NAME})")
    try:
        return BuildManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise QuantlabError(f"{path}: not a valid build manifest ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def built_from(folder: str | Path) -> str | None:
    """The base model's display name, when `folder` is a quantlab build; None otherwise."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data["base"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_method(folder: str | Path) -> dict[str, Any] | None:
    """The recipe method a build was made with ({name, label, params}), when `folder` is a build."""
    path = Path(folder) / MANIFEST_NAME
    try:
        method = json.loads(path.read_text(encoding="utf-8"))["method"]
        return method if isinstance(method, dict) and {"name", "label", "params"} <= set(method) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
