"""Three sources of weights behind one interface: the Hub, a local folder, and synthetic.

`resolve_config` finds a model's config without touching weights (used by the plan's dry run);
`load_model` materialises the model on the target device in the target dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from quantlab import bundled
from quantlab.schema.build import built_from
from quantlab.placement import recover_interrupted_replace
from quantlab.checkpoint import check_config_sizes, check_folder, read_config
from quantlab.errors import QuantlabError, summary
from quantlab.kernels import compute_dtype
from quantlab.schema.environment import WeightsInfo
from quantlab.known_models import KNOWN_MODELS, known_by_hub_id, known_config_dir
from quantlab.recipe import ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any | None
    config: PretrainedConfig
    info: WeightsInfo


@dataclass(frozen=True)
class ResolvedConfig:
    config: PretrainedConfig  # the whole checkpoint's config (VL config for Qwen3.6-27B)
    name: str
    location: str
    notes: tuple[str, ...] = ()


def resolve_config(spec: ModelSpec) -> ResolvedConfig:
    if spec.source == "bundled":
        folder = _bundled_dir()
        return ResolvedConfig(_config_from_folder(folder), "quantlab-bundled", str(folder))
    if spec.source == "local":
        folder = Path(spec.path).expanduser()
        notes = recover_interrupted_replace(folder)  # a `build --force` killed between its two renames
        config = _config_from_folder(folder)
        # a quantlab build is named after the model it was built from (its quantlab_build.json)
        name = built_from(folder) or folder.resolve().name
        return ResolvedConfig(config, name, str(folder), tuple(notes))
    if spec.source == "synthetic":
        return _synthetic_config(spec.config)
    return _hub_config(spec.id, spec.revision)


def _bundled_dir() -> Path:
    try:
        return bundled.bundled_model_dir()
    except FileNotFoundError as exc:
        raise QuantlabError(str(exc)) from None


def _config_from_folder(folder: Path) -> PretrainedConfig:
    if not folder.is_dir():
        raise QuantlabError(f"{folder}: model folder not found{_why_missing(folder)}")
    raw = read_config(folder)
    model_type = raw["model_type"]
    check_config_sizes(raw, str(folder / "config.json"))  # before transformers: it names the field, not the value
    if model_type not in CONFIG_MAPPING:
        raise QuantlabError(
            f"{folder}/config.json: unknown architecture (model_type {model_type[:100]!r}): transformers "
            f"{_transformers_version()} does not know it. Upgrade transformers, or check the config."
        )
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any way transformers rejects a user's config is one message
        raise QuantlabError(f"{folder}/config.json: transformers cannot read it ({summary(exc)})") from None


def _why_missing(path: Path) -> str:
    if path.is_symlink():
        return " (a symbolic link to nothing, or a loop of links)"
    if path.exists():
        return " (it is a file, not a folder)"
    return ""


def _synthetic_config(name: str) -> ResolvedConfig:
    if name in KNOWN_MODELS:
        folder = known_config_dir(name)
        return ResolvedConfig(AutoConfig.from_pretrained(folder), KNOWN_MODELS[name].display_name, name)
    if name == "bundled":
        return ResolvedConfig(AutoConfig.from_pretrained(_bundled_dir()), "quantlab-bundled", "bundled")
    path = Path(name).expanduser()
    folder = path.parent if path.name == "config.json" else path
    if not _is_file(folder / "config.json"):
        known = ", ".join([*KNOWN_MODELS, "bundled"])
        raise QuantlabError(f"model.config: '{name}' is neither a shipped config ({known}) nor a config.json or its folder")
    return ResolvedConfig(_config_from_folder(folder), folder.resolve().name, str(path))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, a path through a file
        return False


def _hub_config(repo_id: str, revision: str | None) -> ResolvedConfig:
    """The cached config if there is one; else quantlab's shipped copy for a known model; else the Hub."""
    display = repo_id.rsplit("/", 1)[-1]
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return ResolvedConfig(_config_from_folder(Path(cached).parent), display, repo_id)
    known = known_by_hub_id(repo_id)
    if known is not None:
        note = f"plan uses quantlab's shipped config of {repo_id} (not in the HF cache yet); loading uses the Hub's"
        return ResolvedConfig(AutoConfig.from_pretrained(known_config_dir(known.key)), display, repo_id, (note,))
    try:
        return ResolvedConfig(AutoConfig.from_pretrained(repo_id, revision=revision), display, repo_id)
    except (OSError, ValueError) as exc:
        raise QuantlabError(hub_unavailable_message(repo_id, exc)) from None


def hub_unavailable_message(repo_id: str, exc: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    known = known_by_hub_id(repo_id)
    synthetic = f"\n  - or measure with random weights of the exact shapes: model: {{source: synthetic, config: {known.key}}}" if known else ""
    from huggingface_hub import constants

    return (
        f"{repo_id}: the weights are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub "
        f"cannot be reached ({why}).\nTo get them:\n"
        f"  - on a machine with network: hf download {repo_id}   (HF_HOME decides where the cache is)\n"
        f"  - or copy a downloaded folder here and use model: {{source: local, path: /that/folder}}"
        f"{synthetic}"
    )


def select_variant(config: PretrainedConfig, variant: str) -> tuple[PretrainedConfig, type]:
    """The config to instantiate and the auto class that loads it."""
    text_config = getattr(config, "text_config", None)
    if variant == "text":
        return (text_config or config), AutoModelForCausalLM
    if text_config is None:
        raise QuantlabError(
            f"model.variant 'full' needs a checkpoint with a vision tower; this one ({config.model_type}) is text-only. "
            "Use variant: text."
        )
    return config, AutoModelForImageTextToText


def model_class_name(config: PretrainedConfig, auto_class: type) -> str:
    return auto_class._model_mapping[type(config)].__name__


def load_model(
    spec: ModelSpec, resolved: ResolvedConfig, device: torch.device, load_kwargs: dict[str, Any] | None = None
) -> LoadedModel:
    """`load_kwargs`: extra from_pretrained arguments from the method's handler (e.g. bitsandbytes'
    quantization_config); synthetic weights never go through from_pretrained, so they ignore them."""
    config, auto_class = select_variant(resolved.config, spec.variant)
    dtype = DTYPES[spec.dtype]
    if spec.source == "synthetic":
        model, tokenizer, revision = _synthetic(config, auto_class, device, dtype, spec.seed), None, None
    else:
        location = _weights_location(spec, resolved)
        kwargs = {**awq_kernel_kwargs(spec, resolved.config), **(load_kwargs or {})}
        model = _from_pretrained(auto_class, location, spec.revision, dtype, device, **kwargs)
        tokenizer = load_tokenizer(location, spec.revision)
        revision = getattr(model.config, "_commit_hash", None) if spec.source == "hub" else None
    ran_in = compute_dtype(model)
    info = WeightsInfo(
        name=resolved.name,
        source=spec.source,
        weights="synthetic" if spec.source == "synthetic" else "real",
        location=resolved.location,
        revision=revision,
        model_class=type(model).__name__,
        variant=spec.variant,
        dtype=ran_in,
        requested_dtype=spec.dtype if ran_in != spec.dtype else None,
    )
    return LoadedModel(model.eval(), tokenizer, config, info)


def awq_kernel_kwargs(spec: ModelSpec, config: PretrainedConfig) -> dict[str, Any]:
    """from_pretrained's quantization_config that picks the AWQ kernel (transformers takes only its
    loading attributes, the backend, from it; the checkpoint's own config keeps the rest)."""
    if spec.awq_kernel is None or not is_awq_checkpoint(config):
        return {}
    from transformers import AwqConfig

    return {"quantization_config": AwqConfig(backend=spec.awq_kernel)}


def is_awq_checkpoint(config: PretrainedConfig) -> bool:
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    return bool(qc) and qc.get("quant_method") == "awq"


def dtype_note(info: WeightsInfo) -> tuple[str, ...]:
    if info.requested_dtype is None:
        return ()
    return (f"ran in {info.dtype}, not the recipe's {info.requested_dtype}: transformers changed it while loading "
            "(its AWQ CUDA kernels take float16)",)


def _weights_location(spec: ModelSpec, resolved: ResolvedConfig) -> str:
    if spec.source == "hub":
        return spec.id
    check_folder(resolved.location)
    return resolved.location


def _from_pretrained(
    auto_class: type, location: str, revision: str | None, dtype: torch.dtype, device: torch.device, **extra: Any
):
    try:
        return load_pretrained(auto_class, location, revision=revision, dtype=dtype, device_map=str(device), **extra)
    except OSError as exc:
        if Path(location).exists():
            raise QuantlabError(f"{location}: could not load the weights: {exc}") from None
        raise QuantlabError(hub_unavailable_message(location, exc)) from None


def load_pretrained(auto_class: type, location: str | Path, **kwargs: Any) -> torch.nn.Module:
    """`auto_class.from_pretrained`, where every tensor of the model must come from the checkpoint: transformers
    fills a missing tensor at random and drops an unexpected one, with a warning that is easy to miss (and that
    quantlab quiets). Either is an error here, naming the tensors; so is a shape mismatch."""
    try:
        # mismatched shapes come back in the loading info, named, instead of as "look at the above report"
        model, info = auto_class.from_pretrained(location, output_loading_info=True, ignore_mismatched_sizes=True,
                                                 **kwargs)
    except RuntimeError as exc:
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        raise QuantlabError(f"{location}: the checkpoint does not load: {_error_summary(str(exc))}") from None
    problems = loading_problems(info)
    if problems:
        raise QuantlabError(f"{location}: the checkpoint does not match the model; not measuring a model whose "
                            f"weights transformers made up or dropped: {problems}")
    return model


def loading_problems(info: dict) -> str:
    """The missing, unexpected and misshapen tensors of transformers' loading info, in one line ('' when none)."""
    parts = []
    for key, what in (("missing_keys", "missing from the checkpoint (filled in at random)"),
                      ("unexpected_keys", "in the checkpoint but not in the model (dropped)")):
        names = sorted(info.get(key) or ())
        if names:
            parts.append(f"{len(names)} tensor(s) {what}: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else ""))
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = ", ".join(f"{n}: checkpoint {list(a)}, model {list(b)}" for n, a, b in mismatched[:8])
        parts.append(f"{len(mismatched)} tensor(s) of another shape: {shown}")
    errors = info.get("error_msgs") or []
    if errors:
        parts.append(f"{len(errors)} loading error(s): {str(errors[0]).splitlines()[0][:200]}")
    return "; ".join(parts)


def _error_summary(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    return "; ".join(lines[:5])[:600]


def load_tokenizer(location: str | None, revision: str | None = None):
    """The checkpoint's tokenizer, or None where it has none (a checkpoint without one still measures)."""
    if location is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(location, revision=revision)
    except Exception:  # a checkpoint without tokenizer files still measures fine
        return None


def _synthetic(config: PretrainedConfig, auto_class: type, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights with the config's exact shapes, created directly on the device in the dtype."""
    torch.manual_seed(seed)
    with torch.device(device):
        return auto_class.from_config(config, dtype=dtype)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
