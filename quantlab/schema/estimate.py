"""What `quantlab estimate` found, as data: measurements/estimates.json, read back by the report. No torch."""

from __future__ import annotations

from quantlab.schema.frozen import Frozen

SCHEMA_VERSION = 1


class PointEstimate(Frozen):
    context: int
    batch: int
    weights: int
    kv_cache: int
    deltanet_state: int
    activations: int
    workspace: int
    allocator_overhead: int
    cuda_context: int
    allocated: int
    total: int
    decode_read_bytes: int | None = None  # one decode step's reads: weights but the lookup table, + KV and state
    host_weights: int = 0  # weights kept in host memory by the runtime (llama.cpp's token_embd), not in `weights`


class ContextFitEstimate(Frozen):
    gpu_gib: float  # the card's marketed size: "24 GB" cards have 24 GiB
    budget_bytes: int
    max_context: int
    limit: str


class MethodEstimate(Frozen):
    key: str
    label: str
    method: str
    source: str
    weights_bytes: int  # what is loaded, in the estimate's scope
    checkpoint_bytes: int  # every tensor: vision tower and MTP included
    bits_per_weight: float
    component_bytes: dict[str, int]
    formats: dict[str, int]  # storage format → parameters
    points: list[PointEstimate]
    fits: list[ContextFitEstimate]


class ModelFacts(Frozen):
    name: str
    location: str
    model_class: str
    parameters_by_role: dict[str, int]
    loaded_parameters: int
    notes: list[str]


class Assumptions(Frozen):
    profile: str
    scope: str
    batch: int
    kv_dtype: str
    state_dtype: str
    prefill_chunk: int | None
    cuda_context_bytes: int
    allocator_overhead: float
    overheads_source: str
    overheads: str  # one line for people
    kv_bytes_per_token: float
    deltanet_state_bytes_per_sequence: float
    activation_bytes_per_token: int


class GpuShareEstimate(Frozen):
    """One GPU of a split, at the split's longest context."""

    device: str
    weights: int
    full_attention_layers: int | None = None  # accelerate: the layers this GPU holds; None under TP (a slice of all)
    deltanet_layers: int | None = None
    total_at_max_context: int | None = None  # what nvidia-smi would show there


class MultiGpuEstimate(Frozen):
    """A method on a set of equal GPUs, split by accelerate's device map or by vLLM's tensor parallelism."""

    method: str  # the scheme key
    gpus: str  # e.g. "2x24"
    count: int
    gpu_gib: float
    # "accelerate" (whole layers per GPU; "accelerate-sequential" where its balanced map spills) or "vllm-tp"
    # (every layer cut across the GPUs)
    split: str
    per_gpu: list[GpuShareEstimate] = []
    max_context: int = 0
    limit: str = ""
    unavailable: str | None = None  # why there is no such split (does not fit, not divisible, not modelled)


class EstimateResult(Frozen):
    schema_version: int = SCHEMA_VERSION
    created_at: str
    quantlab_version: str
    model: ModelFacts
    assumptions: Assumptions
    methods: list[MethodEstimate]
    claims: list[dict] = []  # quantlab.estimate.claims.ClaimRow dumps
    checks: list[dict] = []  # quantlab.estimate.against_records.MeasuredCheck dumps
    multi_gpu: list[MultiGpuEstimate] = []  # `--gpus`: each method on each GPU set, both ways of splitting
