"""Trackers: a known allocation and a known sleep are measured as such; CUDA paths need a GPU."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

from quantlab.stats import summarize
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe

gpu = pytest.mark.gpu
MB = 1_000_000


def quiet_heap() -> None:
    """Garbage left by earlier tests collected now, not inside the tracked block: a collection there (the allocation
    below can trigger one) frees memory while the block grows, and the growth read 0 in one full-suite run."""
    gc.collect()


def test_known_cpu_allocation_within_5_percent():
    size = 300 * MB
    quiet_heap()
    with MemoryTracker("cpu", interval_s=0.002) as mem:
        block = np.ones(size, dtype=np.uint8)  # ones: every page is touched, so it is resident
    growth = mem.result.rss_growth_bytes
    assert abs(growth - size) <= 0.05 * size, growth
    assert mem.result.rss_peak_bytes >= mem.result.rss_end_bytes
    del block


def test_short_lived_peak_is_caught_by_the_sampler():
    size = 300 * MB
    quiet_heap()
    with MemoryTracker("cpu", interval_s=0.002) as mem:
        block = np.ones(size, dtype=np.uint8)
        time.sleep(0.05)  # several sampling intervals while the block is alive
        del block
    peak_over_start = mem.result.rss_peak_bytes - mem.result.rss_start_bytes
    assert abs(peak_over_start - size) <= 0.05 * size, peak_over_start
    assert mem.result.rss_growth_bytes < 0.5 * size


def test_cpu_tracker_reports_no_gpu_figures_rather_than_zero():
    with MemoryTracker("cpu") as tracker:
        pass
    result = tracker.result
    assert result.allocated_peak_bytes is None and result.nvml_device_used_peak_bytes is None


def test_timer_measures_a_known_sleep():
    durations, outer = [], []
    for _ in range(3):
        start = time.perf_counter()
        with Timer("cpu") as t:
            time.sleep(0.2)
        outer.append(time.perf_counter() - start)  # a busy machine oversleeps: bound by what really passed
        durations.append(t.result.seconds)
    assert all(0.2 <= d <= o for d, o in zip(durations, outer)), (durations, outer)
    assert 0.2 <= summarize(durations).median <= max(outer)
    assert t.result.synchronized is False


def test_summary_statistics():
    s = summarize([3.0, 1.0, 2.0])
    assert (s.n, s.median, s.min, s.max, s.p90) == (3, 2.0, 1.0, 3.0, None)
    s = summarize([float(i) for i in range(1, 11)])
    assert s.p90 == pytest.approx(9.1)
    with pytest.raises(ValueError):
        summarize([])


def test_nvml_without_driver_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU and NVML")
    probe = NvmlProbe(torch.device("cpu"))
    assert probe.unavailable and "NVML unavailable" in probe.unavailable
    assert probe.device_used() is None and probe.process_used() is None


@gpu
def test_known_cuda_allocation_is_measured_exactly():
    device = torch.device("cuda", 0)
    size = 256 * 2**20  # a multiple of the allocator's 512-byte rounding: exact
    before = torch.cuda.memory_allocated(device)
    with MemoryTracker(device) as mem:
        block = torch.ones(size, dtype=torch.uint8, device=device)
    r = mem.result
    assert r.allocated_end_bytes - before == size
    assert r.allocated_peak_bytes >= before + size
    assert r.reserved_peak_bytes >= size
    if not r.notes:  # NVML present: nvidia-smi's view includes the CUDA context
        assert r.nvml_device_used_peak_bytes >= r.reserved_peak_bytes
    del block


@gpu
def test_cuda_timer_waits_for_queued_kernels():
    device = torch.device("cuda", 0)
    a = torch.randn(4096, 4096, device=device)
    with Timer(device) as t:
        for _ in range(20):
            a = a @ a.T / 4096
    assert t.result.synchronized and t.result.seconds > 0
