"""`quantlab estimate`'s computation: weights per method, memory per context, longest context per GPU.

The result (quantlab/schema/estimate.py) is frozen, torch-free data, written to measurements/estimates.json
and read back by `quantlab report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import quantlab
from quantlab.estimate import DEFAULT_CONTEXTS
from quantlab.estimate.overheads import describe_overheads
from quantlab.estimate.model import EstimationModel
from quantlab.estimate.multi_gpu import GpuSet, multi_gpu_estimates, note_fewer_gpus_fit_more
from quantlab.estimate.runtime import (
    RuntimeAssumptions,
    activation_bytes_per_token,
    check_point,
    deltanet_state_bytes,
    kv_bytes_per_token,
    max_context,
    memory_at,
    runtime_profile,
)
from quantlab.estimate.schemes import Scheme
from quantlab.roofline import decode_read_bytes
from quantlab.estimate.weights import WeightsEstimate, estimate_weights
from quantlab.schema.estimate import (
    Assumptions,
    ContextFitEstimate,
    EstimateResult,
    MethodEstimate,
    ModelFacts,
    PointEstimate,
)
from quantlab.schema.record import utc_now

GIB = 1 << 30


@dataclass(frozen=True)
class EstimateRequest:
    schemes: tuple[Scheme, ...]
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    batch: int = 1
    gpu_gib: tuple[float, ...] = (24.0,)
    runtime: RuntimeAssumptions = field(default_factory=RuntimeAssumptions)
    include_vision: bool = False
    include_mtp: bool = False
    dtype: str = "bfloat16"  # what unquantized tensors are kept in
    gpu_sets: tuple[GpuSet, ...] = ()  # `--gpus 2x24,1x48`: each method split across each set

    @property
    def scope(self) -> str:
        extras = [name for name, on in (("vision tower", self.include_vision), ("MTP", self.include_mtp)) if on]
        return "text model" + (f" + {' + '.join(extras)}" if extras else " (no vision tower, no MTP)")


def estimate(model: EstimationModel, request: EstimateRequest) -> EstimateResult:
    for context in request.contexts:
        check_point(context, request.batch)
    methods = [_method(model, request, scheme) for scheme in request.schemes]
    return EstimateResult(
        multi_gpu=_multi_gpu(model, request),
        created_at=utc_now(),
        quantlab_version=quantlab.__version__,
        model=_facts(model, request),
        assumptions=_assumptions(model, request),
        methods=methods,
    )


def _multi_gpu(model: EstimationModel, request: EstimateRequest) -> list:
    """Each method on each GPU set; the text model only (what a device map and vLLM's TP split). accelerate's
    split runs in transformers: its rows take the transformers profile whatever --runtime says."""
    rt = request.runtime if request.runtime.profile == "transformers" else runtime_profile("transformers")
    rows = []
    for scheme in request.schemes if request.gpu_sets else ():
        weights = weights_for(model, scheme, request.dtype)
        for gpus in request.gpu_sets:
            rows += multi_gpu_estimates(model, scheme, weights, weights.bytes(False, False), gpus, request.batch, rt)
    return note_fewer_gpus_fit_more(rows)


def lookup_table_bytes(weights: WeightsEstimate) -> int:
    """The input embedding table, read one row per sequence by a decode step; 0 when lm_head is that table."""
    table = weights.component("embed_tokens")
    return table.bytes if table is not None and weights.component("lm_head") is not None else 0


def weights_for(model: EstimationModel, scheme: Scheme, dtype: str = "bfloat16") -> WeightsEstimate:
    return estimate_weights(model.inventory, scheme, model.shape.layers, dtype)


def _method(model: EstimationModel, request: EstimateRequest, scheme: Scheme) -> MethodEstimate:
    weights = weights_for(model, scheme, request.dtype)
    loaded = weights.bytes(request.include_vision, request.include_mtp)
    rt, shape = request.runtime, model.shape
    points = [memory_at(weights, loaded, shape, c, request.batch, rt) for c in request.contexts]
    fits = [max_context(weights, loaded, shape, round(g * GIB), request.batch, rt) for g in request.gpu_gib]
    return MethodEstimate(
        key=scheme.key,
        label=scheme.label,
        method=scheme.method,
        source=scheme.source,
        weights_bytes=loaded,
        checkpoint_bytes=weights.bytes(include_vision=True, include_mtp=True),
        bits_per_weight=8 * loaded / weights.parameters(request.include_vision, request.include_mtp),
        component_bytes={c.role: c.bytes for c in weights.components},
        formats=weights.formats(request.include_vision, request.include_mtp),
        points=[PointEstimate(**vars(p), allocated=p.allocated, total=p.total,
                              decode_read_bytes=decode_read_bytes(loaded, lookup_table_bytes(weights),
                                                                  p.kv_cache + p.deltanet_state))
                for p in points],
        fits=[
            ContextFitEstimate(gpu_gib=g, budget_bytes=f.budget_bytes, max_context=f.tokens, limit=f.limit)
            for g, f in zip(request.gpu_gib, fits)
        ],
    )


def _facts(model: EstimationModel, request: EstimateRequest) -> ModelFacts:
    skip = {r for r, on in (("vision", request.include_vision), ("mtp", request.include_mtp)) if not on}
    by_role = model.inventory.by_role()
    return ModelFacts(
        name=model.name,
        location=model.location,
        model_class=model.inventory.model_class,
        parameters_by_role=by_role,
        loaded_parameters=sum(n for role, n in by_role.items() if role not in skip),
        notes=[*model.notes, *_context_notes(model, request)],
    )


def _context_notes(model: EstimationModel, request: EstimateRequest) -> list[str]:
    native = model.shape.max_positions
    beyond = [c for c in request.contexts if native and c > native]
    if not beyond:
        return []
    listed = ", ".join(f"{c:,}" for c in beyond)
    return [f"contexts {listed} exceed the native {native:,} positions: they need RoPE scaling (YaRN)"]


def _assumptions(model: EstimationModel, request: EstimateRequest) -> Assumptions:
    rt, shape = request.runtime, model.shape
    return Assumptions(
        profile=rt.profile,
        scope=request.scope,
        batch=request.batch,
        kv_dtype=rt.kv_dtype,
        state_dtype=rt.state_dtype,
        prefill_chunk=rt.prefill_chunk,
        cuda_context_bytes=rt.cuda_context_bytes,
        allocator_overhead=rt.allocator_overhead,
        overheads_source=rt.overheads_source,
        overheads=describe_overheads(rt),
        kv_bytes_per_token=kv_bytes_per_token(shape, rt.kv_dtype),
        deltanet_state_bytes_per_sequence=deltanet_state_bytes(shape, rt.state_dtype),
        activation_bytes_per_token=activation_bytes_per_token(shape, rt.activation_bytes),
    )
