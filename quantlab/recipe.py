"""Typed recipe files: one YAML file fully describes one run.

Validation happens here, before any weights are touched. Every error names the file,
the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from quantlab.errors import QuantlabError, RecipeError
from quantlab.fields import parse_size, PathText, RepoId, Seed
from quantlab.methods import Method, NoQuant, QuantConfig, config_class, known_methods, method_for, registered
from quantlab.runtimes import RUNTIME_NAMES, RUNTIMES
from quantlab.strict_yaml import excerpt, load_strict, read_text_file
from quantlab.text.source import TextSourceSpec
from quantlab.model_spec import DTYPE_BYTES, ModelSpec, _Strict  # noqa: F401  (DTYPE_BYTES: the recipe's name too)
from quantlab.llamacpp.settings import LlamaCppSpec  # noqa: F401
from quantlab.vllm_server.settings import VllmSpec
from quantlab.schema.speculative import SpeculativeSpec

MAX_CONTEXT = 1_048_576  # ~1M tokens: the YaRN-extended ceiling of Qwen3.6; anything above is a typo
MAX_RECIPE_BYTES = 64 * 1024  # a recipe is a few kilobytes; records keep its text
MAX_POINTS = 64  # contexts, and batch sizes, measured by one recipe
MAX_PROBLEMS = 20  # validation problems listed in one error; the rest are counted


class MeasureSpec(_Strict):
    """The measurement plan: which points to measure and how often."""

    contexts: list[int] = Field(default_factory=lambda: [128], min_length=1, max_length=MAX_POINTS)
    new_tokens: int = Field(32, ge=1, le=65536)
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1, max_length=MAX_POINTS)
    warmup: int = Field(1, ge=0, le=100)
    repeats: int = Field(3, ge=1, le=1000)
    seed: Seed = 0
    memory_sample_ms: float = Field(20.0, gt=0, le=1000)  # background RSS/NVML sampling; shorter costs decode speed on the CPU
    runtime: Literal[RUNTIME_NAMES] = Field("transformers", description="how the model is loaded and run "
                                            "(quantlab/runtimes/)")
    llama_cpp: LlamaCppSpec | None = Field(None, description="settings of the llama.cpp runtime")
    vllm: VllmSpec | None = Field(None, description="settings of the vLLM runtime")
    speculative: SpeculativeSpec | None = Field(None, description="speculative decoding with the model's MTP head, "
                                                "measured on and off in the same run (llama.cpp, vLLM)")

    @model_validator(mode="after")
    def _settings_match_runtime(self) -> "MeasureSpec":
        if self.llama_cpp is not None and self.runtime != "llama.cpp":
            raise ValueError(f"llama_cpp sets the llama.cpp runtime, but runtime is {self.runtime!r}")
        if self.vllm is not None and self.runtime != "vllm":
            raise ValueError(f"vllm sets the vLLM runtime, but runtime is {self.runtime!r}")
        seqs = (self.vllm or VllmSpec()).max_num_seqs
        if self.runtime == "vllm" and max(self.batch_sizes) > seqs:
            raise ValueError(f"batch {max(self.batch_sizes)} is more sequences than vLLM runs at once here "
                             f"(measure.vllm.max_num_seqs {seqs})")
        self._check_speculative()
        if self.runtime == "llama.cpp" and self.batch_sizes != [1]:
            raise ValueError("the llama.cpp runtime measures one sequence (batch_sizes: [1]); "
                             "measure.llama_cpp.slots sizes the memory of parallel slots")
        return self

    def _check_speculative(self) -> None:
        if self.speculative is None:
            return
        entry = RUNTIMES[self.runtime]
        if entry.speculative is None:
            able = " or ".join(name for name, e in RUNTIMES.items() if e.speculative)
            raise ValueError(f"speculative: the {self.runtime} runtime cannot run MTP speculative decoding here "
                             f"(transformers ignores the mtp.* tensors at load); set measure.runtime: {able}")
        k = max(self.speculative.tokens)
        if k >= self.new_tokens:
            raise ValueError(f"speculative.tokens: k = {k} drafts as many tokens as a whole decode makes "
                             f"(new_tokens {self.new_tokens}); give k below new_tokens, or more new_tokens")

    @field_validator("contexts")
    @classmethod
    def _contexts_in_range(cls, values: list[int]) -> list[int]:
        for v in values:
            if not 1 <= v <= MAX_CONTEXT:
                raise ValueError(f"each context must be between 1 and {MAX_CONTEXT:,} tokens, got {excerpt(v)}")
        if len(set(values)) != len(values):
            raise ValueError(f"contexts must not repeat, got {values}")
        return values

    @field_validator("batch_sizes")
    @classmethod
    def _batches_in_range(cls, values: list[int]) -> list[int]:
        for v in values:
            if not 1 <= v <= 4096:
                raise ValueError(f"each batch size must be between 1 and 4096, got {excerpt(v)}")
        if len(set(values)) != len(values):
            raise ValueError(f"batch_sizes must not repeat, got {values}")
        return values


class OutputSpec(_Strict):
    """Where records go, and whether the report is regenerated after the run."""

    dir: PathText = "measurements"
    report: bool = True


class BuildSpec(_Strict):
    """`quantlab build`: the build folder, its model card's metadata and its greedy check."""

    out: PathText | None = Field(None, description="build folder (default: builds/<recipe name>); --out overrides")
    base_model: RepoId | None = Field(None, description="the card's base_model (a Hub id); default: the hub source's id")
    license: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$",
                                description="the card's license; default: the source's model card, else ask")
    prompt: str = Field("def fibonacci(n):", min_length=1, max_length=4096,
                        description="prompt of the recorded greedy generation")
    check_tokens: int = Field(16, ge=1, le=512, description="greedy tokens recorded at build time, checked by verify")
    max_shard_size: str = Field("5GB", pattern=r"^\d{1,12}(\.\d{1,6})?\s*(KB|MB|GB|KiB|MiB|GiB)$")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size_in_range(cls, value: str) -> str:
        if not 10**6 <= parse_size(value) <= 10**12:
            raise ValueError(f"must be between 1MB and 1000GB, got {value!r}")
        return value


class QualityReference(_Strict):
    """The model a candidate is compared with. Default: the recipe's model, same dtype, method none."""

    model: ModelSpec | None = Field(None, description="default: the recipe's model spec, unquantized")
    cache_dir: PathText | None = Field(
        None, description="stored mode: folder of cached reference statistics (default: <output dir>/quality-cache)"
    )


class QualitySpec(TextSourceSpec):
    """Quality against the reference on held-out text: perplexity, KL divergence, top-1 agreement, Δp.

    See quantlab/quality/ for the method; the cross-field checks run in the plan, before weights load.
    """

    WHERE: ClassVar[str] = "quality"

    tokens: int = Field(4096, ge=2, le=100_000_000, description="tokens of held-out text to use")
    context: int = Field(512, ge=2, le=MAX_CONTEXT, description="window length")
    stride: int | None = Field(None, ge=1, le=MAX_CONTEXT, description="window step; default: half the context")
    mode: Literal["paired", "stored"] = "paired"
    top_k: int = Field(128, ge=1, le=1_000_000, description="stored mode: reference log-probs kept per token")
    reference: QualityReference = Field(default_factory=QualityReference)

    @property
    def effective_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.context // 2)


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    description: str = ""
    model: ModelSpec
    quantization: QuantConfig = Field(default_factory=NoQuant)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    quality: QualitySpec | None = None
    build: BuildSpec | None = None  # quantlab build: optional; defaults apply without it

    @model_validator(mode="after")
    def _method_matches_runtime(self) -> "Recipe":
        if self.model.source == "gguf":
            check_gguf_source(self.quantization, self.measure.runtime)
        else:
            check_runtime(self.quantization, self.measure.runtime)
        method_for(self.quantization).check_model(self.quantization, self.model)
        layers = self.measure.llama_cpp.gpu_layers if self.measure.llama_cpp else None
        if self.model.device == "cpu" and layers not in (None, 0):
            raise ValueError(f"measure.llama_cpp.gpu_layers {layers!r} offloads layers to a GPU, but model.device is "
                             "cpu: leave gpu_layers out, or set model.device: cuda")
        return self


def check_gguf_source(qconfig, runtime: str) -> None:
    """A GGUF file is measured as it is, by a runtime that loads GGUF files."""
    if qconfig.method != "none":
        raise ValueError(f"model.source gguf is a file already quantized (its header says the type), so "
                         f"quantization.method {qconfig.method} has nothing to do: set quantization: {{method: none}}")
    if "gguf" not in RUNTIMES[runtime].loads:
        able = " or ".join(name for name, entry in RUNTIMES.items() if "gguf" in entry.loads)
        raise ValueError(f"model.source gguf: the {runtime} runtime does not load GGUF files; set measure.runtime: {able}")


def check_runtime(qconfig, runtime: str) -> None:
    """The method makes what the runtime loads (raise ValueError): from what each declares, not from their names.
    A method whose artifact only some runtimes load names them; a runtime that loads only some methods' artifacts
    names those methods."""
    method = method_for(qconfig)
    entry = RUNTIMES[runtime]
    if method.makes in entry.loads and entry.own_process and method.in_process:
        raise ValueError(f"measure.runtime {runtime} loads what a method wrote to disk, in a process of its own: "
                         f"{method.in_process}")
    if method.makes in entry.loads:
        return
    if method.makes != Method.makes:
        able = [name for name, entry in RUNTIMES.items() if method.makes in entry.loads]
        raise ValueError(f"quantization.method {method.name} is measured through {' or '.join(able)}: set "
                         f"measure.runtime: {able[0]}")
    takers = [m for m in registered() if m.makes in RUNTIMES[runtime].loads]
    hints = "".join(f" ({m.unquantized_hint})" for m in takers if m.unquantized_hint)
    raise ValueError(f"measure.runtime {runtime} runs {' and '.join(m.measured_form for m in takers)}: set "
                     f"quantization.method: {' or '.join(m.name for m in takers)}{hints}")


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    text: str
    sha256: str


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file; raise RecipeError with every problem found."""
    path = Path(path)
    if not path.exists():
        why = "a symbolic link that leads nowhere (broken, or a loop)" if path.is_symlink() else "recipe file not found"
        raise RecipeError(f"{path}: {why}")
    try:
        text = read_text_file(path, "recipe", MAX_RECIPE_BYTES)
    except QuantlabError as exc:
        raise RecipeError(str(exc)) from None
    data = _parse_yaml(path, text)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(path, exc)) from None
    return LoadedRecipe(recipe, path, text, hashlib.sha256(text.encode()).hexdigest())


def _parse_yaml(path: Path, text: str) -> dict[str, Any]:
    try:
        data = load_strict(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow: no mark, a position
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise RecipeError(f"{path}: not valid YAML (line {line}, column {column}): character "
                          f"{excerpt(chr(exc.character) if isinstance(exc.character, int) else exc.character)} "
                          f"is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise RecipeError(_bounded(f"{path}: not valid YAML{where}: {problem}")) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def format_validation_error(path: Path, exc: ValidationError) -> str:
    errors = exc.errors()
    if len(errors) == 1:  # one problem, one line
        err = errors[0]
        return _bounded(f"{path}: {_dotted(_without_method_tag(err['loc']))}: {_describe(err)}", 600)
    lines = [f"{path}: {len(errors)} problem(s) in the recipe:"]
    for err in errors[:MAX_PROBLEMS]:
        loc = _dotted(_without_method_tag(err["loc"]))
        lines.append(_bounded(f"  - {loc}: {_describe(err)}"))
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"  - ... and {len(errors) - MAX_PROBLEMS} more")
    return "\n".join(lines)


def _bounded(line: str, limit: int = 400) -> str:
    return line if len(line) <= limit else f"{line[:limit - 30]}... ({len(line):,} chars in all)"


def _describe(err: dict[str, Any]) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(err["loc"][:-1]))
        return f"unknown key {excerpt(err['loc'][-1])}; allowed keys here: {allowed}"
    if kind == "missing":
        return "required, but missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        methods = ", ".join(repr(m) for m in known_methods())
        got = f"unknown method {excerpt(err['ctx']['tag'])}" if kind == "union_tag_invalid" else "'method' is missing"
        return f"{got}; allowed methods: {methods}"
    message = err["msg"].removeprefix("Value error, ")
    if kind == "value_error" or isinstance(value, dict):
        return message
    return f"{message} (got {excerpt(value)})"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys a recipe allows at a location, for 'unknown key' messages."""
    model: type[BaseModel] = Recipe
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            continue
        if model is Recipe and part == "quantization":
            model = config_class(parts.pop(0)) if parts else NoQuant  # pydantic puts the method tag next
            continue
        annotation = model.model_fields[part].annotation
        annotation = next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)


def _without_method_tag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(loc) > 1 and loc[0] == "quantization" and config_class(str(loc[1])):
        return loc[:1] + loc[2:]
    return loc
