"""Trackers: a known allocation and a known sleep are measured as such; CUDA paths need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from quantlab.stats import summarize
from quantlab.trackers import MemoryTracker, Timer
from quantlab.trackers.nvml import NvmlProbe

gpu = pytest.mark.gpu
MB = 1_000_000


# Each known allocation is tracked in a fresh Python process: in this one, what earlier tests left in the allocator
# (memory freed but still resident, a collection of their garbage) can serve the block or shrink the RSS while it
# grows. Seen in full-suite runs: a 300 MB block read as 35 MB of growth, and as a 4 KB peak.
TRACKED = """
import json, sys, time
import numpy as np
from quantlab.trackers import MemoryTracker
size, hold = int(sys.argv[1]), sys.argv[2] == "hold"
with MemoryTracker("cpu", interval_s=0.002) as mem:
    block = np.ones(size, dtype=np.uint8)  # ones: every page is touched, so it is resident
    if not hold:
        time.sleep(0.05)  # several sampling intervals while the block is alive
        del block
r = mem.result
print(json.dumps({"start": r.rss_start_bytes, "end": r.rss_end_bytes, "peak": r.rss_peak_bytes}))
"""


def tracked_in_a_fresh_process(size: int, hold: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", TRACKED, str(size), "hold" if hold else "free"],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_known_cpu_allocation_within_5_percent():
    size = 300 * MB
    r = tracked_in_a_fresh_process(size, hold=True)
    growth = r["end"] - r["start"]
    assert abs(growth - size) <= 0.05 * size, growth
    assert r["peak"] >= r["end"]


def test_short_lived_peak_is_caught_by_the_sampler():
    size = 300 * MB
    r = tracked_in_a_fresh_process(size, hold=False)
    peak_over_start = r["peak"] - r["start"]
    assert abs(peak_over_start - size) <= 0.05 * size, peak_over_start
    assert r["end"] - r["start"] < 0.5 * size


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
