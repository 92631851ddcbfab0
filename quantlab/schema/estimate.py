"""What `quantlab estimate` found, as data: measurements/estimates.json, read back by the report. No torch."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from quantlab.schema.bounds import AtLeastOne, Count, EstimateBytes, Finite, NonNegative, Positive, shaped
from quantlab.schema.frozen import Frozen

B = EstimateBytes  # every byte figure below

SCHEMA_VERSION = 1


class PointEstimate(Frozen):
    context: AtLeastOne
    batch: AtLeastOne
    weights: B
    kv_cache: B
    deltanet_state: B
    activations: B
    workspace: B
    allocator_overhead: B
    cuda_context: B
    allocated: B
    total: B
    decode_read_bytes: B | None = None  # one decode step's reads: weights but the lookup table, + KV and state
    host_weights: B = 0  # weights kept in host memory by the runtime (llama.cpp's token_embd), not in `weights`


class ContextFitEstimate(Frozen):
    gpu_gib: Positive  # the card's marketed size: "24 GB" cards have 24 GiB
    budget_bytes: B
    max_context: Count
    limit: str


class MethodEstimate(Frozen):
    key: str
    label: str
    method: str
    source: str
    weights_bytes: B  # what is loaded, in the estimate's scope
    checkpoint_bytes: B  # every tensor: vision tower and MTP included
    bits_per_weight: NonNegative
    component_bytes: dict[str, B]
    formats: dict[str, Count]  # storage format → parameters
    points: list[PointEstimate]
    fits: list[ContextFitEstimate]


class ModelFacts(Frozen):
    name: str
    location: str
    model_class: str
    parameters_by_role: dict[str, Count]
    loaded_parameters: Count
    notes: list[str]


class Assumptions(Frozen):
    profile: str
    scope: str
    batch: AtLeastOne
    kv_dtype: str
    state_dtype: str
    prefill_chunk: AtLeastOne | None
    cuda_context_bytes: B
    allocator_overhead: NonNegative
    overheads_source: str
    overheads: str  # one line for people
    kv_bytes_per_token: NonNegative
    deltanet_state_bytes_per_sequence: NonNegative
    activation_bytes_per_token: B


class GpuShareEstimate(Frozen):
    """One GPU of a split, at the split's longest context."""

    device: str
    weights: B
    full_attention_layers: Count | None = None  # accelerate: the layers this GPU holds; None under TP (a slice of all)
    deltanet_layers: Count | None = None
    total_at_max_context: B | None = None  # what nvidia-smi would show there


class MultiGpuEstimate(Frozen):
    """A method on a set of equal GPUs, split by accelerate's device map or by vLLM's tensor parallelism."""

    method: str  # the scheme key
    gpus: str  # e.g. "2x24"
    count: AtLeastOne
    gpu_gib: Positive
    # "accelerate" (whole layers per GPU; "accelerate-sequential" where its balanced map spills) or "vllm-tp"
    # (every layer cut across the GPUs)
    split: str
    per_gpu: list[GpuShareEstimate] = []
    max_context: Count = 0
    limit: str = ""
    unavailable: str | None = None  # why there is no such split (does not fit, not divisible, not modelled)


class ClaimRow(Frozen):
    """One of the article's claims: claim | estimate | measured | verdict (quantlab.estimate.claims makes them; the
    report reads them back from estimates.json)."""

    id: str
    claim: str
    estimate: str
    measured: str
    verdict: str
    detail: str = ""
    # What the verdict rests on: a GPU measurement, a runtime's allocation, a published file or report, or
    # quantlab's estimate; where an estimate contradicts the evidence it cites, the verdict says so.
    basis: str = "estimate"
    assumptions: str = ""  # the runtime profile behind the row, shared by several rows
    estimate_gb: Finite | None = None  # for the plot
    claimed_low_gb: Finite | None = None
    claimed_high_gb: Finite | None = None
    measured_gb: Finite | None = None


class CheckShape(BaseModel):
    """What the report reads of an estimate-vs-measurement row (quantlab.estimate.against_records.MeasuredCheck)."""

    model_config = ConfigDict(extra="allow")
    model: str
    variant: str
    method: str
    hardware: str
    weights: str
    context: AtLeastOne
    batch: AtLeastOne
    estimated_weights: B
    measured_weights: B
    estimated_allocated: B
    measured_allocated: Annotated[B, Field(ge=1)]  # the delta divides by it
    estimated_total: B
    measured_total: B | None = None


class EstimateResult(Frozen):
    schema_version: int = SCHEMA_VERSION
    created_at: str
    quantlab_version: str
    model: ModelFacts
    assumptions: Assumptions
    methods: list[MethodEstimate]
    claims: list[Annotated[dict, shaped(ClaimRow)]] = []
    checks: list[Annotated[dict, shaped(CheckShape)]] = []  # quantlab.estimate.against_records.MeasuredCheck dumps
    multi_gpu: list[MultiGpuEstimate] = []  # `--gpus`: each method on each GPU set, both ways of splitting
