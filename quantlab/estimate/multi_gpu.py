"""Memory per GPU of a model split across several, for `quantlab estimate --gpus 2x24,1x48`.

- accelerate (transformers' device_map="auto"): whole decoder layers per GPU, one GPU working at a time. The
  map is the one a run computes (quantlab/device_map.py: transformers' own `_get_device_map` on the meta
  device, bitsandbytes' layers sized by its quantizer), each GPU offering its size less the CUDA context, as
  its free memory would on an idle card. A GPU then holds its share of the weights (the estimator's bytes for
  the scheme, split in the proportions the map gives), the KV cache of its full-attention layers, the state
  of its DeltaNet layers, one layer's prefill activations, the logits where lm_head sits, the workspace of a
  quantized matmul, the allocator's overhead and a CUDA context.
- vLLM tensor parallelism (quantlab/estimate/tensor_parallel.py): every linear split across the ranks.

The longest context of a GPU set is the longest at which every GPU fits.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace

from quantlab.errors import QuantlabError
from quantlab.estimate.model import EstimationModel
from quantlab.estimate.runtime import (
    RuntimeAssumptions,
    activation_bytes_per_token,
    check_point,
    deltanet_state_bytes,
    kv_bytes_per_token,
    longest_fitting,
    workspace_bytes,
)
from quantlab.estimate.schemes import Scheme
from quantlab.estimate.vllm_cache import VllmCache
from quantlab.estimate.weights import WeightsEstimate
from quantlab.recipe import MAX_CONTEXT
from quantlab.schema.estimate import GpuShareEstimate, MultiGpuEstimate

GIB = 1 << 30
MAX_GPUS_PER_SET = 64
MAX_GPU_SETS = 8  # each set maps every method on the meta device: about a second each
# GPU sizes, GiB: from a tenth (the bundled model fits) to 4 TiB, past any GPU or unified-memory machine made
MIN_GPU_GIB, MAX_GPU_GIB = 0.1, 4096.0
_GPU_SET = re.compile(r"(\d{1,3})\s*[x×]\s*(\d{1,4}(?:\.\d{1,3})?)")


@dataclass(frozen=True)
class GpuSet:
    count: int
    gib: float  # each GPU's marketed size: "24 GB" cards have 24 GiB

    @property
    def label(self) -> str:
        return f"{self.count}x{self.gib:g}"


def parse_gpu_sets(text: str) -> tuple[GpuSet, ...]:
    """'2x24,1x48' → (2 GPUs of 24 GiB, 1 GPU of 48 GiB)."""
    if not str(text).strip():
        raise QuantlabError("--gpus: give at least one GPU set, COUNTxSIZE (e.g. 2x24 for two 24 GB GPUs)")
    sets = []
    for item in (part.strip() for part in str(text).split(",")):
        match = _GPU_SET.fullmatch(item)
        if not match:
            raise QuantlabError(f"--gpus: '{item[:40]}' is not COUNTxSIZE (e.g. 2x24 for two 24 GB GPUs, 1x48 for one 48 GB)")
        count, gib = int(match.group(1)), float(match.group(2))
        if not 1 <= count <= MAX_GPUS_PER_SET:
            raise QuantlabError(f"--gpus: '{item}': 1 to {MAX_GPUS_PER_SET} GPUs of a positive size")
        check_gpu_gib(gib, "--gpus", item)
        sets.append(GpuSet(count, gib))
    unique = tuple(dict.fromkeys(sets))
    if len(unique) > MAX_GPU_SETS:
        raise QuantlabError(f"--gpus: {len(unique)} GPU sets; give at most {MAX_GPU_SETS}")
    return unique


def check_gpu_gib(gib: float, flag: str, given: str) -> None:
    """A GPU size in GiB: finite and within MIN_GPU_GIB..MAX_GPU_GIB, or one line naming the option."""
    if not (math.isfinite(gib) and MIN_GPU_GIB <= gib <= MAX_GPU_GIB):
        raise QuantlabError(f"{flag}: '{given[:40]}': a GPU size is {MIN_GPU_GIB:g} to {MAX_GPU_GIB:,.0f} GiB "
                            "(e.g. 24 for a 24 GB card)")


@dataclass(frozen=True)
class GpuShare:
    """What one GPU of a split holds that sets its memory."""

    device: str
    weight_bytes: int
    full_attention_layers: int
    deltanet_layers: int
    has_lm_head: bool
    strategy: str = "balanced"  # accelerate's map: balanced (device_map="auto"), sequential where that spills, even


@dataclass(frozen=True)
class SplitMemory:
    """One GPU's memory at a context: allocated (the torch allocator's peak) and total (nvidia-smi's)."""

    device: str
    weights: int
    kv_cache: int
    deltanet_state: int
    activations: int
    total: int


@dataclass(frozen=True)
class AccelerateMaps:
    """Two accelerate maps of one method on one GPU set: the one a run computes, and the even one."""

    run: tuple[GpuShare, ...]  # device_map="auto" (balanced; sequential where that spills), as quantlab run plans it
    even: tuple[GpuShare, ...] | None  # the sequential map under one cap per GPU (device_map.even_split)
    even_cap: int | None  # that cap, bytes per GPU


def accelerate_shares(model: EstimationModel, scheme: Scheme, weights_bytes: int, gpus: GpuSet,
                      rt: RuntimeAssumptions) -> tuple[GpuShare, ...] | str:
    """Each GPU's share under the device map a run computes; a sentence instead when there is no such split."""
    maps = accelerate_maps(model, scheme, weights_bytes, gpus, rt)
    return maps if isinstance(maps, str) else maps.run


def accelerate_maps(model: EstimationModel, scheme: Scheme, weights_bytes: int, gpus: GpuSet,
                    rt: RuntimeAssumptions) -> AccelerateMaps | str:
    """The run's map and the even map, both from one meta-device build; a sentence when there is no split."""
    if scheme.is_gguf:
        return "GGUF files run in llama.cpp, which splits by its own rules (--tensor-split), not accelerate's"
    if model.text_model is None:
        return "no text model to map"
    from quantlab.device_map import DoesNotFit, MetaLayout, even_split, run_split

    offered = {f"cuda:{i}": round(gpus.gib * GIB) - rt.cuda_context_bytes for i in range(gpus.count)}
    try:
        config, quantization_config = _as_loaded(scheme, model)
        layout = MetaLayout.build(config, model.text_model[1], _torch_dtype(), quantization_config)
        split = run_split(layout, offered)
        even = even_split(layout, offered)
    except DoesNotFit as exc:
        if exc.total > 1.25 * weights_bytes:
            return _not_this_scheme(exc.total, weights_bytes)
        return (f"does not fit: {weights_bytes / 1e9:.2f} GB of weights; accelerate's map, balanced or sequential, "
                f"spills past {gpus.count} x {gpus.gib:g} GiB (less a CUDA context each)")
    except (ImportError, ValueError, RuntimeError) as exc:  # a quantizer this machine cannot build
        return f"no device map here ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
    mapped = sum(split.bytes_per_device.values())
    if mapped > 1.25 * weights_bytes:  # e.g. fused MoE expert tensors, which transformers' quantizer leaves whole
        return _not_this_scheme(mapped, weights_bytes)
    layer_types = _layer_types(config)
    return AccelerateMaps(
        run=_shares(split, offered, layer_types, weights_bytes, mapped),
        even=_shares(even, offered, layer_types, weights_bytes, mapped) if even else None,
        even_cap=next(iter(even.max_memory.values())) if even else None,
    )


def _shares(split, offered: dict[str, int], layer_types: list[str], weights_bytes: int,
            mapped: int) -> tuple[GpuShare, ...]:
    """Every GPU of the set, empty ones too, in order; the scheme's bytes split in the map's proportions."""
    shares = []
    for device in sorted(offered, key=lambda d: int(d.split(":")[1])):
        kinds = Counter(layer_types[i] for i in split.layers_per_device.get(device, ()))
        shares.append(GpuShare(
            device=device,
            weight_bytes=round(weights_bytes * split.bytes_per_device.get(device, 0) / mapped),
            full_attention_layers=kinds["full_attention"],
            deltanet_layers=kinds["linear_attention"],
            has_lm_head=split.device_of("lm_head") == device,
            strategy=split.strategy,
        ))
    return tuple(shares)


def share_memory(share: GpuShare, model: EstimationModel, weights: WeightsEstimate, context: int, batch: int,
                 rt: RuntimeAssumptions) -> SplitMemory:
    """One GPU's memory at `context` × `batch` (runtime.py's model, restricted to the layers it holds)."""
    check_point(context, batch)
    shape = model.shape
    held = replace(shape, full_attention_layers=share.full_attention_layers, deltanet_layers=share.deltanet_layers)
    kv = round(kv_bytes_per_token(held, rt.kv_dtype) * context * batch)
    state = round(deltanet_state_bytes(held, rt.state_dtype) * batch)
    chunk = min(context, rt.prefill_chunk or context) * batch
    holds_layers = share.full_attention_layers + share.deltanet_layers > 0
    if not holds_layers and not share.has_lm_head and not share.weight_bytes:
        return SplitMemory(share.device, 0, 0, 0, 0, 0)  # a GPU the map leaves empty: no CUDA context either
    activations = (chunk * activation_bytes_per_token(shape, rt.activation_bytes) if holds_layers else 0)
    activations += batch * shape.vocab * (rt.activation_bytes + 4) if share.has_lm_head else 0
    allocated = share.weight_bytes + kv + state + activations + (workspace_bytes(weights, shape, chunk) if holds_layers else 0)
    total = allocated + round(allocated * rt.allocator_overhead) + rt.cuda_context_bytes
    return SplitMemory(share.device, share.weight_bytes, kv, state, activations, total)


def longest_context(shares: tuple[GpuShare, ...], model: EstimationModel, weights: WeightsEstimate, gpus: GpuSet,
                    batch: int, rt: RuntimeAssumptions) -> tuple[int, str]:
    """The longest context at which every GPU fits (binary search: memory only grows with context), and which
    GPU stops it."""
    budget = round(gpus.gib * GIB)

    def over(context: int) -> str | None:
        return next((s.device for s in shares if share_memory(s, model, weights, context, batch, rt).total > budget), None)

    tokens = longest_fitting(lambda c: over(c) is None)
    if tokens == MAX_CONTEXT:
        return tokens, f"max context ({MAX_CONTEXT:,})"
    return tokens, f"memory ({over(tokens + 1)})"


def multi_gpu_estimates(model: EstimationModel, scheme: Scheme, weights: WeightsEstimate, loaded_bytes: int,
                        gpus: GpuSet, batch: int, rt: RuntimeAssumptions) -> list[MultiGpuEstimate]:
    """`scheme` on `gpus`, split by accelerate's device map (the run's or the even one, whichever fits more) and
    by vLLM's tensor parallelism."""
    return [chosen_accelerate_estimate(model, scheme, weights, loaded_bytes, gpus, batch, rt),
            tensor_parallel_row(model, scheme, gpus, batch)]


def accelerate_estimate(model: EstimationModel, scheme: Scheme, weights: WeightsEstimate, loaded_bytes: int,
                        gpus: GpuSet, batch: int, rt: RuntimeAssumptions) -> MultiGpuEstimate:
    """The row of the map a run computes, whatever it fits."""
    shares = accelerate_shares(model, scheme, loaded_bytes, gpus, rt)
    if isinstance(shares, str):
        return MultiGpuEstimate(**_row_head(scheme, gpus, "accelerate"), unavailable=shares)
    return _map_row(shares, model, scheme, weights, gpus, batch, rt)


def chosen_accelerate_estimate(model: EstimationModel, scheme: Scheme, weights: WeightsEstimate, loaded_bytes: int,
                               gpus: GpuSet, batch: int, rt: RuntimeAssumptions) -> MultiGpuEstimate:
    """The run's map, unless the even map fits a longer context: then the even map, saying why and what the run's
    map would fit. Where both fit the same, the run's map, saying which GPUs it leaves empty."""
    maps = accelerate_maps(model, scheme, loaded_bytes, gpus, rt)
    if isinstance(maps, str):
        return MultiGpuEstimate(**_row_head(scheme, gpus, "accelerate"), unavailable=maps)
    run = _map_row(maps.run, model, scheme, weights, gpus, batch, rt)
    if maps.even is None:
        return run
    even = _map_row(maps.even, model, scheme, weights, gpus, batch, rt)
    if even.max_context > run.max_context:
        why = (f"even map: accelerate's sequential map with each GPU offered {maps.even_cap / GIB:.2f} GiB "
               f"(device_map=\"sequential\", max_memory), chosen over the map a run computes, "
               f"{_strategy_name(run.split)}, which {_what_it_does(run)}")
        return even.model_copy(update={"limit": f"{even.limit}; {why}"})
    if _empty_gpus(run):
        return run.model_copy(update={"limit": f"{run.limit}; the map {_what_it_does(run)}; an even map (one cap on "
                                               f"every GPU) fits no more ({even.max_context:,} tokens)"})
    return run


def _map_row(shares: tuple[GpuShare, ...], model: EstimationModel, scheme: Scheme, weights: WeightsEstimate,
             gpus: GpuSet, batch: int, rt: RuntimeAssumptions) -> MultiGpuEstimate:
    tokens, limit = longest_context(shares, model, weights, gpus, batch, rt)
    split = "accelerate" if shares[0].strategy == "balanced" else f"accelerate-{shares[0].strategy}"
    if not tokens:
        limit += ": the weights fit, but not one token's memory beside them"
    per_gpu = [GpuShareEstimate(
        device=s.device, weights=s.weight_bytes, full_attention_layers=s.full_attention_layers,
        deltanet_layers=s.deltanet_layers,
        total_at_max_context=share_memory(s, model, weights, tokens, batch, rt).total if tokens else None,
    ) for s in shares]
    return MultiGpuEstimate(**_row_head(scheme, gpus, split), per_gpu=per_gpu, max_context=tokens, limit=limit)


def _row_head(scheme: Scheme, gpus: GpuSet, split: str) -> dict:
    return dict(method=scheme.key, gpus=gpus.label, count=gpus.count, gpu_gib=gpus.gib, split=split)


def _strategy_name(split: str) -> str:
    return "accelerate's sequential map" if split == "accelerate-sequential" else "accelerate's balanced map"


def _empty_gpus(row: MultiGpuEstimate) -> tuple[str, ...]:
    return tuple(g.device for g in row.per_gpu if not g.weights)


def _what_it_does(row: MultiGpuEstimate) -> str:
    """'leaves cuda:0-6 (7 GPUs) empty and fits 12,226 tokens'."""
    from quantlab.device_map import device_list

    empty = _empty_gpus(row)
    fits = f"fits {row.max_context:,} tokens" if row.max_context else "leaves no room for one token"
    return f"leaves {device_list(empty)} empty and {fits}" if empty else fits


def note_fewer_gpus_fit_more(rows: list[MultiGpuEstimate]) -> list[MultiGpuEstimate]:
    """More GPUs of one size should fit at least the context fewer do; where a split's rules make them fit less,
    the row says which smaller set fits more, rather than letting more GPUs read as less context silently."""
    noted = []
    for row in rows:
        fewer = [r for r in rows if _same_kind(r, row) and r.count < row.count and r.max_context > row.max_context]
        if fewer and not row.unavailable:
            best = max(fewer, key=lambda r: r.max_context)
            row = row.model_copy(update={"limit": f"{row.limit}; fewer GPUs fit more: {best.gpus} fits "
                                                  f"{best.max_context:,} tokens"})
        noted.append(row)
    return noted


def _same_kind(a: MultiGpuEstimate, b: MultiGpuEstimate) -> bool:
    return (a.method == b.method and a.gpu_gib == b.gpu_gib and _family(a) == _family(b) and not a.unavailable)


def _family(row: MultiGpuEstimate) -> str:
    """accelerate (its run, sequential and even maps alike) or vllm."""
    return row.split.split("-")[0]


def tensor_parallel_row(model: EstimationModel, scheme: Scheme, gpus: GpuSet, batch: int) -> MultiGpuEstimate:
    from quantlab.estimate.tensor_parallel import tensor_parallel_estimate

    row = _row_head(scheme, gpus, "vllm-tp")
    try:
        tp = tensor_parallel_estimate(model, scheme, gpus.count)
    except QuantlabError as exc:
        return MultiGpuEstimate(**row, unavailable=str(exc))
    gpu_bytes = round(gpus.gib * GIB)
    fit = tp.max_context(gpu_bytes, batch)
    pool = tp.cache(tp.kv_space(gpu_bytes), max(fit.tokens, 1))
    # vLLM gives the KV pool all of its share of the GPU, whatever the context
    total = tp.fixed_bytes() + pool.num_blocks * pool.bytes_per_block if fit.tokens else None
    per_gpu = [GpuShareEstimate(device=f"cuda:{i}", weights=tp.weight_bytes, total_at_max_context=total)
               for i in range(gpus.count)]
    if not fit.tokens:
        return MultiGpuEstimate(**row, per_gpu=per_gpu, unavailable=(
            f"does not fit: {tp.weight_bytes / 1e9:.2f} GB of weights per GPU and one request's KV blocks exceed "
            f"{fit.budget_bytes / 1e9:.2f} GB, vLLM's 0.9 of each GPU"))
    return MultiGpuEstimate(**row, per_gpu=per_gpu, max_context=fit.tokens, limit=f"{fit.limit}; {pool_note(pool)}")


def pool_note(pool: VllmCache) -> str:
    """vLLM's KV pool in a few words: blocks, block size, padding, the state a request holds."""
    padding = f", mamba page padded {pool.mamba_page_padding_pct:.2f}%" if pool.mamba_page_padding_pct else ""
    return (f"vLLM's pool: {pool.num_blocks:,} blocks of {pool.block_size} tokens{padding}, "
            f"{pool.state_blocks_per_request} state blocks ({pool.state_bytes_per_request / 1e6:,.0f} MB) per request")


def _not_this_scheme(mapped: int, weights_bytes: int) -> str:
    return (f"no map for this scheme: transformers' quantizer sizes the model at {mapped / 1e9:.2f} GB, the scheme at "
            f"{weights_bytes / 1e9:.2f} GB (it leaves tensors whole that the scheme quantizes, e.g. fused MoE experts)")


def _layer_types(config) -> list[str]:
    text = getattr(config, "text_config", None) or config
    return list(text.layer_types)


def _torch_dtype():
    import torch

    return torch.bfloat16


def _as_loaded(scheme: Scheme, model: EstimationModel):
    """The config and from_pretrained's quantization_config for the scheme, as a run would load it, from the method
    the scheme stands for (bitsandbytes quantizes at load; an AWQ checkpoint's config.json carries its own). Either
    way transformers' quantizer sizes the quantized layers of the map."""
    from quantlab.methods import method_named
    from quantlab.quantize.skips import skip_plan
    from quantlab.sources import meta_model

    config, auto_class = model.text_model
    method = method_named(scheme.method)
    qconfig = method.scheme_config(scheme.key) if method is not None else None
    if qconfig is None:
        return config, None
    patterns = skip_plan(meta_model(config, auto_class), method.name).patterns
    return method.as_loaded(qconfig, config, tuple(patterns))
