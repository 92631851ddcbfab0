"""The estimate against quantlab's own GPU measurements, point by point.

For each GPU record the estimator recomputes its point (model, variant, method, context, batch)
on the transformers profile and compares:
- weights: torch allocated after load vs the estimated weight bytes;
- prefill peak: torch max allocated while prefilling vs the estimated allocated peak
  (weights + KV cache + DeltaNet state + activations + workspace); the goal is within 5%;
- device total: NVML process peak vs the estimated total (with the fitted overheads, so this
  one is in-sample when the overheads were fitted on the same records).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantlab.errors import QuantlabError
from quantlab.estimate.model import EstimationModel, read_estimation_model
from quantlab.estimate.overheads import contradiction
from quantlab.estimate.runtime import RuntimeAssumptions, memory_at
from quantlab.methods import method_named
from quantlab.estimate.schemes import Scheme, get_scheme
from quantlab.estimate.weights import estimate_weights
from quantlab.schema.record import Record

GOAL = 0.05


class MeasuredCheck(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    record_id: str
    model: str
    variant: str
    method: str
    hardware: str
    weights: str  # real or synthetic
    context: int
    batch: int
    estimated_weights: int
    measured_weights: int
    estimated_allocated: int
    measured_allocated: int
    estimated_total: int
    measured_total: int | None

    @property
    def allocated_delta(self) -> float:
        return self.estimated_allocated / self.measured_allocated - 1

    @property
    def within_goal(self) -> bool:
        return abs(self.allocated_delta) <= GOAL


def scheme_for(record: Record) -> Scheme | None:
    """The estimator scheme of a record's method, or None when the table has no such scheme."""
    method = method_named(record.method.name)
    key = method.estimator_scheme(record.method.params, record.model.dtype) if method else None
    return _maybe(key) if key else None


def _maybe(name: str) -> Scheme | None:
    try:
        return get_scheme(name)
    except QuantlabError:
        return None


def model_argument(record: Record) -> str:
    """What `--model` would be for the record's weights."""
    return "bundled" if record.model.source == "bundled" else record.model.location


def check_records(records: list[Record], rt: RuntimeAssumptions) -> tuple[list[MeasuredCheck], list[str]]:
    """A check per usable GPU record, and one note per record that could not be checked."""
    models: dict[str, EstimationModel | None] = {}
    checks, notes = [], []
    for r in records:
        memory = r.result.prefill_memory
        if r.hardware.kind != "gpu" or r.result.status != "ok" or memory is None or not memory.allocated_peak_bytes:
            continue
        if contradiction(r) is not None:
            continue  # said once, by overheads.skipped_records
        scheme = scheme_for(r)
        model = _cached_model(models, model_argument(r), notes)
        if scheme is None or model is None:
            notes.append(f"{r.record_id}: not checked ({'no estimator scheme for ' + r.method.label if scheme is None else 'its config did not resolve'})")
            continue
        checks.append(_check(r, model, scheme, rt))
    return checks, notes


def _cached_model(models: dict[str, EstimationModel | None], name: str, notes: list[str]) -> EstimationModel | None:
    if name not in models:
        try:
            models[name] = read_estimation_model(name)
        except QuantlabError as exc:  # the message names the config already, or is given its name
            notes.append(str(exc) if str(exc).startswith(name) else f"{name}: {exc}")
            models[name] = None
    return models[name]


def _check(r: Record, model: EstimationModel, scheme: Scheme, rt: RuntimeAssumptions) -> MeasuredCheck:
    weights = estimate_weights(model.inventory, scheme, model.shape.layers, r.model.dtype)
    loaded = weights.bytes(include_vision=r.model.variant == "full")
    point = memory_at(weights, loaded, model.shape, r.point.context, r.point.batch, rt)
    memory = r.result.prefill_memory
    return MeasuredCheck(
        record_id=r.record_id,
        model=r.model.name,
        variant=r.model.variant,
        method=r.method.label,
        hardware=r.hardware.name,
        weights=r.model.weights,
        context=r.point.context,
        batch=r.point.batch,
        estimated_weights=loaded,
        measured_weights=r.load_memory.allocated_end_bytes or 0,
        estimated_allocated=point.allocated,
        measured_allocated=memory.allocated_peak_bytes,
        estimated_total=point.total,
        measured_total=memory.nvml_process_used_peak_bytes,
    )
