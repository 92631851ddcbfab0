"""The transformers runtime: how a model is loaded (from_pretrained, or random weights from a config), run for
prefill and decode, and what its weights and cache occupy. The measurement loop (quantlab/measure.py) is
shared by every runtime; this module is what it calls for transformers.
"""

from __future__ import annotations

import copy

import inspect
from typing import Any

import torch
from transformers import PretrainedConfig

from quantlab.device_map import DeviceSplit, accelerate_device
from quantlab.checkpoint_formats import gptq_block_modules
from quantlab.errors import QuantlabError
from quantlab.kernels import compute_dtype, kernels_of
from quantlab.hf_loading import hub_unavailable_message
from quantlab.runtimes.base import LoadedModel, LoadRequest, Runtime
from quantlab.schema.environment import WeightsInfo
from quantlab.schema.measurement import Kernels

NAME = "transformers"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TransformersRuntime(Runtime):
    name = NAME

    def version(self) -> str:
        import transformers

        return transformers.__version__

    def settings(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}

    def parameter_count(self, model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def load(self, request: LoadRequest) -> LoadedModel:
        return load_model(request.source, request.device, dict(request.from_pretrained), request.split)

    def prefill(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return prefill(model, ids)

    def decode(self, model: torch.nn.Module, next_ids: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        return decode(model, next_ids, cache, steps)

    def cache_bytes(self, cache: Any) -> int:
        return tensor_bytes(cache)

    def vocab_size(self, model: torch.nn.Module) -> int:
        return model.get_input_embeddings().num_embeddings

    def weight_bytes(self, model: torch.nn.Module) -> int:
        return model_bytes(model)

    def lookup_table_bytes(self, model: torch.nn.Module) -> int:
        return lookup_table_bytes(model)

    def kernels(self, model: torch.nn.Module) -> Kernels:
        found = kernels_of(model)
        if any(p.device.type == "cpu" for p in model.parameters()):
            # the ISA level torch's CPU kernels dispatch to here (DEFAULT, AVX2, AVX512...): the CPU code that ran
            found = found.model_copy(update={"cpu_backend": f"torch {torch.backends.cpu.get_cpu_capability()}"})
        return found


# ---- loading ------------------------------------------------------------------------------------------------

def load_model(source, device: torch.device, load_kwargs: dict[str, Any] | None = None,
               split: DeviceSplit | None = None) -> LoadedModel:
    """`source`: a quantlab.sources.ModelSource. `load_kwargs`: extra from_pretrained arguments from the method (e.g. bitsandbytes' quantization_config);
    synthetic weights never go through from_pretrained, so they ignore them. `split`: the plan's device map
    for a model split across devices, given to from_pretrained (or to accelerate's dispatch) as it is."""
    spec = source.spec
    config, auto_class = source.variant()
    dtype = DTYPES[spec.dtype]
    if source.synthetic and split is not None:
        model, tokenizer, revision = synthetic_split(config, auto_class, split.device_map, dtype, spec.seed), None, None
    elif source.synthetic:
        model, tokenizer, revision = _synthetic(config, auto_class, device, dtype, spec.seed), None, None
    else:
        kwargs = {**awq_kernel_kwargs(spec.awq_kernel, source.config), **gptq_kwargs(config, source.files()),
                  **(load_kwargs or {})}
        placement = split.accelerate_map() if split is not None else str(device)
        model = _from_pretrained(auto_class, source.load_location(), spec.revision, dtype, placement, **kwargs)
        tokenizer = source.tokenizer()
        revision = getattr(model.config, "_commit_hash", None) if source.from_hub else None
    ran_in = compute_dtype(model)
    info = WeightsInfo(
        name=source.name, source=spec.source, weights=source.weights, location=source.location, revision=revision,
        model_class=type(model).__name__, variant=spec.variant, dtype=ran_in,
        requested_dtype=spec.dtype if ran_in != spec.dtype else None,
    )
    return LoadedModel(model.eval(), tokenizer, config, info)


def gptq_kwargs(config: PretrainedConfig, folder) -> dict[str, Any]:
    """A GPTQ checkpoint that does not say which Linears of its blocks are quantized: its config, with the list read
    from its shards, given to from_pretrained (quantlab/checkpoint_formats.py says why). Its files are not changed."""
    modules = gptq_block_modules(config, folder)
    if modules is None:
        return {}
    config = copy.deepcopy(config)
    qc = config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict()
    config.quantization_config = {**qc, "modules_in_block_to_quantize": [modules]}
    return {"config": config}


def awq_kernel_kwargs(kernel: str | None, config: PretrainedConfig) -> dict[str, Any]:
    """from_pretrained's quantization_config that picks the AWQ kernel (transformers takes only its
    loading attributes, the backend, from it; the checkpoint's own config keeps the rest)."""
    if kernel is None or not is_awq_checkpoint(config):
        return {}
    from transformers import AwqConfig

    return {"quantization_config": AwqConfig(backend=kernel)}


def is_awq_checkpoint(config: PretrainedConfig) -> bool:
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    return bool(qc) and qc.get("quant_method") == "awq"


def _from_pretrained(
    auto_class: type, location: str, revision: str | None, dtype: torch.dtype, device_map: str | dict, **extra: Any
):
    try:
        return load_pretrained(auto_class, location, revision=revision, dtype=dtype, device_map=device_map, **extra)
    except OSError as exc:
        from pathlib import Path

        if Path(location).exists():
            raise QuantlabError(f"{location}: could not load the weights: {exc}") from None
        raise QuantlabError(hub_unavailable_message(location, exc)) from None


def load_pretrained(auto_class: type, location, **kwargs: Any) -> torch.nn.Module:
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


def _synthetic(config: PretrainedConfig, auto_class: type, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights with the config's exact shapes, created directly on the device in the dtype."""
    torch.manual_seed(seed)
    with torch.device(device):
        return auto_class.from_config(config, dtype=dtype)


def synthetic_split(config: PretrainedConfig, auto_class: type, device_map: dict[str, str], dtype: torch.dtype,
                    seed: int):
    """Random weights for a model split across devices: built on the meta device, each mapped module created on its
    own device and initialised there (never the whole model on one), then dispatched with accelerate's hooks."""
    from accelerate import dispatch_model, init_empty_weights

    torch.manual_seed(seed)
    with init_empty_weights():
        model = auto_class.from_config(config, dtype=dtype)
    for name, device in device_map.items():
        module = model.get_submodule(name) if name else model
        module.to_empty(device=device, recurse=True)
        module.apply(model._init_weights)
    model.tie_weights()
    return dispatch_model(model, device_map={n: accelerate_device(d) for n, d in device_map.items()})


# ---- running ------------------------------------------------------------------------------------------------

def prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """One forward over the prompt; only the last position's logits are computed, as servers do."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), _cache_of(out)


def decode(model: torch.nn.Module, next_ids: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
    """`steps` greedy tokens, one forward each, reusing the cache. Returns (batch, steps + 1) tokens."""
    key = cache_argument(model)
    generated = [next_ids]
    for _ in range(steps):
        out = model(input_ids=next_ids, use_cache=True, **{key: cache})
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(next_ids)
    return torch.cat(generated, dim=1).cpu()


def cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; accept either."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# ---- what it occupies ---------------------------------------------------------------------------------------

def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of all distinct tensors reachable from a cache object."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer: what the weights occupy, quantized or not."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + quant_state_bytes(model)


def lookup_table_bytes(model: torch.nn.Module) -> int:
    """The input embedding table, which a decode step reads one row of per sequence, not whole; 0 when
    lm_head shares it (then every step reads it whole)."""
    table = getattr(model.get_input_embeddings(), "weight", None)
    output_layer = getattr(model, "get_output_embeddings", lambda: None)()
    output = getattr(output_layer, "weight", None)
    if table is None or table is output or table.device.type == "meta":
        return 0
    return table.numel() * table.element_size()


def quant_state_bytes(model: torch.nn.Module) -> int:
    """Bytes bitsandbytes keeps beside its weights, outside parameters and buffers: the int8 row
    scales (SCB) and the 4-bit quantization state (absmax, code, nested statistics)."""
    total, seen = 0, set()

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            for attr in ("absmax", "code"):
                add(getattr(state, attr, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                for attr in ("absmax", "code"):
                    add(getattr(nested, attr, None))
    return total
