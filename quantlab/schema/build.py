"""quantlab_build.json: what a build folder records about itself. Plain JSON, no torch imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, ValidationError, model_validator

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


TokenId = Annotated[StrictInt, Field(ge=0, lt=1 << 31)]
GGUF_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.gguf$"  # a name in the build folder itself: no path
MAX_GGUF_MANIFEST_BYTES = 1 << 20


class GgufGreedy(Frozen):
    """The greedy tokens llama.cpp produced at build time (BuildSpec: prompt, check_tokens), for verify to repeat."""

    prompt: str = Field(max_length=4096)
    prompt_ids: list[TokenId] = Field(min_length=1, max_length=4096)
    new_tokens: StrictInt = Field(ge=1, le=512)
    tokens: list[TokenId] = Field(max_length=512)

    @model_validator(mode="after")
    def _as_many_tokens_as_asked(self) -> "GgufGreedy":
        if len(self.tokens) != self.new_tokens:
            raise ValueError(f"{len(self.tokens)} tokens recorded for new_tokens {self.new_tokens}")
        return self


class GgufManifest(Frozen):
    """quantlab_gguf_build.json (quantlab/artifact/gguf_build.py writes it). Every path in it is a file name inside
    the build folder: verify reads nothing else."""

    format: Literal["gguf"]
    base_model: str = Field(max_length=300)
    recipe: str = Field(max_length=300)
    method: MethodRef
    llama_cpp: str | None = Field(None, max_length=300)
    notes: list[str] = []
    calibration: str | None = None
    quantize_seconds: float = Field(ge=0, allow_inf_nan=False)
    file: str = Field(pattern=GGUF_FILE_NAME)
    file_bytes: StrictInt = Field(ge=0, lt=1 << 50)
    block_count: StrictInt | None = Field(None, ge=0, le=100_000)
    mtp: StrictBool
    parameters_by_type: dict[str, Annotated[StrictInt, Field(ge=0, lt=1 << 50)]]
    greedy: GgufGreedy
    record_ids: list[str] = []


def write_manifest(folder: Path, manifest: BuildManifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=1) + "\n", encoding="utf-8")


def is_gguf_build(folder: str | Path) -> bool:
    """A folder that claims to be a GGUF build: it holds quantlab_gguf_build.json (read_gguf_manifest checks it)."""
    path = Path(folder) / GGUF_MANIFEST_NAME
    return path.exists() or path.is_symlink()


def read_gguf_manifest(folder: str | Path) -> GgufManifest:
    """The GGUF build's manifest, schema-checked; a QuantlabError in one line saying what is wrong."""
    path = Path(folder) / GGUF_MANIFEST_NAME
    bad = f"{path}: not a valid GGUF build manifest"
    if path.is_symlink() or not path.is_file():
        raise QuantlabError(f"{bad} (a symbolic link or not a regular file)")
    try:
        if path.stat().st_size > MAX_GGUF_MANIFEST_BYTES:
            raise QuantlabError(f"{bad} (larger than {MAX_GGUF_MANIFEST_BYTES:,} bytes)")
        return GgufManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise QuantlabError(f"{bad} (cannot read it: {exc.strerror})") from None
    except ValidationError as exc:
        raise QuantlabError(f"{bad} ({_first_error(exc)})") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "the file"
    more = f"; {exc.error_count() - 1} more problem(s)" if exc.error_count() > 1 else ""
    return f"{where}: {error['msg']}{more}"[:300]


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
