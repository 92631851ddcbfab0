"""The measurement loop: prefill and decode at each (context, batch), warm-up then repeats.

Decode is timed directly over N greedy steps with a KV cache (no early stop at EOS), never
derived as generate-minus-prefill. An out-of-memory error at one point is a finding: it is
recorded and the next point is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from quantlab.runtimes.base import Runtime
from quantlab.schema.measurement import MemoryResult, PointResult
from quantlab.stats import summarize
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.memory import settle
from quantlab.trackers.nvml import NvmlProbe


@dataclass(frozen=True)
class PointSettings:
    context: int
    batch: int
    new_tokens: int
    warmup: int
    repeats: int
    seed: int = 0
    sample_interval_s: float = 0.005


def measure_point(
    runtime: Runtime, model: Any, settings: PointSettings, device: torch.device, nvml: NvmlProbe | None = None,
    progress: bool = True, devices: tuple[torch.device, ...] = (),
) -> PointResult:
    """One (context, batch) point of `model`, run through `runtime` (quantlab/runtimes/). `device` takes the
    inputs; `devices`: every device of a model split across several, each tracked and synchronised."""
    try:
        return _measure(model, runtime, settings, device, nvml, progress, devices)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        error = f"OOM at context {settings.context}, batch {settings.batch}: {_first_line(exc)}"
    free_memory(device, devices)  # outside the except block, so the traceback's tensors can be freed
    return PointResult(status="oom", error=error)


def _measure(model, runtime, s: PointSettings, device, nvml, progress, devices) -> PointResult:
    ids = prompt_ids(runtime.vocab_size(model), s.batch, s.context, s.seed, device)
    runtime.prepare_point(model, s.context, s.batch, s.new_tokens)  # outside the timing (llama.cpp's context)
    pid = runtime.memory_pid(model)  # a runtime's server process, whose RSS is the model's
    prefill_tps, ttft, decode_tps, decode_seq_tps, decode_ms = [], [], [], [], []
    prefill_mem: list[MemoryResult] = []
    decode_mem: list[MemoryResult] = []
    runs = tqdm(range(s.warmup + s.repeats), desc=f"context {s.context:,} × batch {s.batch}", unit="run", leave=False, disable=not progress)
    for run in runs:
        # Each phase starts settled (garbage collected, CUDA cache emptied): its reserved and nvidia-smi
        # peaks are its own, not what the previous phase, repeat or point left cached.
        with torch.inference_mode():
            with (MemoryTracker(device, s.sample_interval_s, nvml, settle_first=True, devices=devices, pid=pid) as pm,
                  Timer(device, devices) as pt):
                next_ids, cache = runtime.prefill(model, ids)
            # A server streams the decode while this process waits: no garbage collection here, which would hold
            # the GIL while tokens queue unread and then time them all at once
            with (MemoryTracker(device, s.sample_interval_s, nvml, settle_first=pid is None, devices=devices, pid=pid) as dm,
                  Timer(device, devices) as dt):
                tokens = runtime.decode(model, next_ids, cache, s.new_tokens)
        cache_bytes = runtime.cache_bytes(cache)
        prefill_s, decode_s = runtime.timed_phases(cache) or (pt.result.seconds, dt.result.seconds)
        del cache
        if run < s.warmup:
            continue
        prefill_tps.append(s.batch * s.context / prefill_s)
        ttft.append(prefill_s)
        decode_tps.append(s.batch * s.new_tokens / decode_s)
        decode_seq_tps.append(s.new_tokens / decode_s)
        decode_ms.append(1000 * decode_s / s.new_tokens)
        prefill_mem.append(pm.result)
        decode_mem.append(dm.result)
    return PointResult(
        status="ok",
        prefill_tokens_per_s=summarize(prefill_tps),
        time_to_first_token_s=summarize(ttft),
        decode_tokens_per_s=summarize(decode_tps),
        decode_tokens_per_s_per_sequence=summarize(decode_seq_tps),
        decode_ms_per_token=summarize(decode_ms),
        prefill_memory=_highest_peak(prefill_mem),
        decode_memory=_highest_peak(decode_mem),
        cache_bytes=cache_bytes,
        first_tokens=tokens[0].tolist(),
        runtime_buffers=runtime.point_buffers(model),
    )


def prompt_ids(vocab_size: int, batch: int, context: int, seed: int, device: torch.device) -> torch.Tensor:
    """Seeded random token ids: speed and memory do not depend on which tokens they are."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, context), generator=generator).to(device)


def _highest_peak(results: list[MemoryResult]) -> MemoryResult:
    return max(results, key=lambda r: (r.allocated_peak_bytes or 0, r.rss_peak_bytes))


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device, devices: tuple[torch.device, ...] = ()) -> None:
    settle(device, devices)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
