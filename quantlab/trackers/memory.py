"""Memory tracker: host RSS always; torch allocator and NVML figures on a CUDA device.

A background thread samples RSS and NVML so that peaks between start and end are caught;
the torch allocator keeps its own exact peak.

`settle_first=True` starts from a known state: garbage collected and, on CUDA, the allocator's cached
blocks given back (`torch.cuda.empty_cache`), so that a phase's reserved and nvidia-smi peaks are
its own and not what an earlier phase left cached. The result says which state it started from.
"""

from __future__ import annotations

import gc
import threading
import psutil
import torch

from quantlab.schema.measurement import MemoryResult
from quantlab.trackers.nvml import NvmlProbe
from quantlab.trackers.timing import synchronize


class _PeakSampler(threading.Thread):
    def __init__(self, interval_s: float, nvml: NvmlProbe | None):
        super().__init__(daemon=True, name="quantlab-memory-sampler")
        self.interval_s = interval_s
        self.nvml = nvml
        self.process = psutil.Process()
        self.stop_event = threading.Event()
        self.rss_peak = 0
        self.device_peak: int | None = None
        self.process_peak: int | None = None
        self.samples = 0
        self.sample()

    def sample(self) -> None:
        self.rss_peak = max(self.rss_peak, self.process.memory_info().rss)
        if self.nvml is not None:
            self.device_peak = _max(self.device_peak, self.nvml.device_used())
            self.process_peak = _max(self.process_peak, self.nvml.process_used())
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.sample()

    def finish(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else max(a, b))


SETTLED_CUDA = "after gc.collect() and torch.cuda.empty_cache()"
SETTLED_CPU = "after gc.collect()"


def settle(device: torch.device) -> str:
    """Collect garbage and, on CUDA, give cached blocks back to the driver. Returns the state reached."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        return SETTLED_CUDA
    return SETTLED_CPU


class MemoryTracker:
    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005, nvml: NvmlProbe | None = None,
                 settle_first: bool = False):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.nvml = nvml if nvml is not None or self.device.type != "cuda" else NvmlProbe(self.device)
        self.settle_first = settle_first
        self.result: MemoryResult | None = None

    def __enter__(self) -> "MemoryTracker":
        self._start_state = settle(self.device) if self.settle_first else None
        self._cuda_start: dict = {}
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = dict(
                allocated_start_bytes=torch.cuda.memory_allocated(self.device),
                reserved_start_bytes=torch.cuda.memory_reserved(self.device),
                nvml_device_used_start_bytes=self.nvml.device_used(),
            )
        self._rss_start = psutil.Process().memory_info().rss
        self._sampler = _PeakSampler(self.interval_s, self.nvml if self.device.type == "cuda" else None)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda" and exc[0] is None:
            synchronize(self.device)
        self._sampler.finish()
        self.result = self._result()
        return False

    def _result(self) -> MemoryResult:
        s = self._sampler
        rss_end = psutil.Process().memory_info().rss
        common = dict(
            device=str(self.device),
            rss_start_bytes=self._rss_start,
            rss_end_bytes=rss_end,
            rss_peak_bytes=max(s.rss_peak, rss_end),
            start_state=self._start_state,
            samples=s.samples,
        )
        if self.device.type != "cuda":
            return MemoryResult(**common)
        notes = tuple(n for n in (self.nvml.unavailable, self.nvml.process_unknown) if n)
        return MemoryResult(
            **common,
            **self._cuda_start,
            allocated_end_bytes=torch.cuda.memory_allocated(self.device),
            allocated_peak_bytes=torch.cuda.max_memory_allocated(self.device),
            reserved_end_bytes=torch.cuda.memory_reserved(self.device),
            reserved_peak_bytes=torch.cuda.max_memory_reserved(self.device),
            nvml_device_used_end_bytes=self.nvml.device_used(),
            nvml_device_used_peak_bytes=s.device_peak,
            nvml_process_used_peak_bytes=s.process_peak,
            nvml_process_basis=self.nvml.process_basis if s.process_peak is not None else None,
            notes=notes,
        )
