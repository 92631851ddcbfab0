"""What a measurement found, as data: no torch, so records, the store and the report read it anywhere."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, model_validator

from quantlab.schema.bounds import AtLeastOne, Bytes, Count, Finite, NonNegative, Positive, SmallId, check_interval
from quantlab.schema.frozen import Frozen

TORCH_FALLBACK = "torch fallback (transformers' reference implementation)"


class Summary(Frozen):
    n: AtLeastOne
    median: Finite
    min: Finite
    max: Finite
    mean: Finite
    stdev: NonNegative | None = None
    p90: Finite | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Summary:
        check_interval(self.min, self.max, self.median, "min-max")
        if self.p90 is not None:
            check_interval(self.min, self.max, self.p90, "min-max around p90")
        return self


def _positive(s: Summary) -> Summary:
    if s.min <= 0:
        raise ValueError(f"a speed or a duration must be above 0 (min {s.min!r})")
    return s


# Speeds and durations: a zero or negative one was not measured.
PositiveSummary = Annotated[Summary, AfterValidator(_positive)]


class TimingResult(Frozen):
    seconds: NonNegative
    synchronized: bool  # True when CUDA work was waited for at both ends


class DeviceMemory(Frozen):
    """One GPU's figures, for a model split across several (MemoryResult.per_device)."""

    device: str
    allocated_start_bytes: Bytes | None = None
    allocated_end_bytes: Bytes | None = None
    allocated_peak_bytes: Bytes | None = None
    reserved_start_bytes: Bytes | None = None
    reserved_end_bytes: Bytes | None = None
    reserved_peak_bytes: Bytes | None = None
    nvml_device_used_start_bytes: Bytes | None = None
    nvml_device_used_end_bytes: Bytes | None = None
    nvml_device_used_peak_bytes: Bytes | None = None  # every process on this GPU
    nvml_process_used_peak_bytes: Bytes | None = None  # this process on this GPU, CUDA context included
    nvml_process_basis: str | None = None


class MemoryResult(Frozen):
    device: str
    rss_start_bytes: Bytes
    rss_end_bytes: Bytes
    rss_peak_bytes: Bytes  # sampled, so a spike shorter than the interval can be missed
    rss_of: str | None = None  # whose RSS: None, quantlab's own process; else a runtime's server and its children
    # CUDA only; None on the CPU (never 0 as a stand-in).
    allocated_end_bytes: Bytes | None = None
    allocated_peak_bytes: Bytes | None = None
    reserved_end_bytes: Bytes | None = None
    reserved_peak_bytes: Bytes | None = None
    nvml_device_used_end_bytes: Bytes | None = None
    nvml_device_used_peak_bytes: Bytes | None = None  # every process on the GPU (nvidia-smi's Memory-Usage)
    nvml_process_used_peak_bytes: Bytes | None = None  # this process only, CUDA context included
    nvml_process_basis: str | None = None  # how this process's NVML figure was found (PID match, sole process)
    # Where the tracked span started from: the allocator's figures then, and the state it was put in.
    allocated_start_bytes: Bytes | None = None
    reserved_start_bytes: Bytes | None = None
    nvml_device_used_start_bytes: Bytes | None = None
    start_state: str | None = None  # e.g. "after gc.collect() and torch.cuda.empty_cache()"; None: as found
    samples: Count = 0
    notes: tuple[str, ...] = ()
    # A model split across GPUs: each GPU's own figures; the fields above are then their sums.
    per_device: tuple[DeviceMemory, ...] = ()

    @property
    def rss_growth_bytes(self) -> int:
        return self.rss_end_bytes - self.rss_start_bytes


class PointResult(Frozen):
    status: Literal["ok", "oom"]
    error: str | None = None
    prefill_tokens_per_s: PositiveSummary | None = None
    time_to_first_token_s: PositiveSummary | None = None
    # aggregate: every sequence of the batch (batch × tokens ÷ seconds)
    decode_tokens_per_s: PositiveSummary | None = None
    decode_tokens_per_s_per_sequence: PositiveSummary | None = None  # what one sequence sees (tokens ÷ seconds)
    decode_ms_per_token: PositiveSummary | None = None  # per decode step, in which every sequence advances one token
    prefill_memory: MemoryResult | None = None  # the repeat with the highest peak
    decode_memory: MemoryResult | None = None
    cache_bytes: Bytes | None = None  # KV cache + DeltaNet states after the last decode step
    first_tokens: list[SmallId] | None = None  # greedy tokens of sequence 0, for reproducibility checks
    # The runtime's own accounting of its buffers (llama.cpp: "CPU KV", "CUDA0 compute", ...), bytes
    runtime_buffers: dict[str, Bytes] | None = None


class Roofline(Frozen):
    gpu: str
    bandwidth_gb_s: Positive
    bandwidth_source: str
    bytes_per_step: Bytes
    bound_tokens_per_s: Positive
    fraction_of_bound: NonNegative
    weight_bytes_read: int | None = None  # of bytes_per_step: weights (input embedding table excluded)
    cache_bytes: Bytes | None = None  # of bytes_per_step: KV cache + DeltaNet state


class Kernels(Frozen):
    """What ran: recorded beside every measurement."""

    deltanet: dict[str, str]  # function -> implementation ("fla.ops...." or the torch fallback); {} without DeltaNet
    linear: tuple[str, ...]  # classes of the quantized Linear modules (e.g. AwqGEMMTritonLinear); () when none
    attention: str | None  # transformers' attention implementation (sdpa, eager, flash_attention_2)
    compute_dtype: str  # dtype of the model's floating-point weights as loaded (AWQ on CUDA: float16)
    # The CPU code that ran: llama.cpp's CPU backend variant and its system-info line; torch's CPU capability for a
    # transformers run on the CPU. None in records from before quantlab recorded it.
    cpu_backend: str | None = None

    @property
    def deltanet_summary(self) -> str:
        if not self.deltanet:
            return "no DeltaNet layers"
        packages = sorted({_package(impl) for impl in self.deltanet.values()})
        return " + ".join(packages)


def _package(implementation: str) -> str:
    if implementation == TORCH_FALLBACK:
        return "torch fallback"
    return implementation.split(".", 1)[0]
