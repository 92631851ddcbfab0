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

from quantlab.schema.measurement import DeviceMemory, MemoryResult
from quantlab.trackers.nvml import NvmlProbe
from quantlab.trackers.timing import synchronize


class _PeakSampler(threading.Thread):
    def __init__(self, interval_s: float, probes: dict[torch.device, NvmlProbe], pid: int | None = None):
        super().__init__(daemon=True, name="quantlab-memory-sampler")
        self.interval_s = interval_s
        self.probes = probes
        self.tree = process_tree(pid)  # listed once: walking /proc at every sample would load the CPU it measures
        self.stop_event = threading.Event()
        self.rss_peak = 0
        self.device_peak: dict[torch.device, int | None] = dict.fromkeys(probes)
        self.process_peak: dict[torch.device, int | None] = dict.fromkeys(probes)
        self.samples = 0
        self.sample()

    def sample(self) -> None:
        self.rss_peak = max(self.rss_peak, _tree_rss(self.tree))
        for device, probe in self.probes.items():
            self.device_peak[device] = _max(self.device_peak[device], probe.device_used())
            self.process_peak[device] = _max(self.process_peak[device], probe.process_used())
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.sample()

    def finish(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def process_tree(pid: int | None = None) -> list[psutil.Process]:
    """This process; with `pid`, that process and every process under it (a server's engine and workers)."""
    if pid is None:
        return [psutil.Process()]
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_bytes(pid: int | None = None) -> int:
    """RSS of this process, or of `pid` and every process under it."""
    return _tree_rss(process_tree(pid))


def _tree_rss(tree: list[psutil.Process]) -> int:
    """A process that has ended counts 0."""
    total = 0
    for process in tree:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else max(a, b))


SETTLED_CUDA = "after gc.collect() and torch.cuda.empty_cache()"
SETTLED_CPU = "after gc.collect()"
SUMMED = ("split across {devices}: the allocator and NVML figures are the sum of each GPU's own peak (an upper "
          "bound on their simultaneous total); per_device has each GPU's")


def settle(device: torch.device, devices: tuple[torch.device, ...] = ()) -> str:
    """Collect garbage and, on CUDA, give cached blocks back to the driver (on every device of a split).
    Returns the state reached."""
    gc.collect()
    cuda = [d for d in (devices or (device,)) if d.type == "cuda"]
    for d in cuda:
        synchronize(d)
    if cuda:
        torch.cuda.empty_cache()
        return SETTLED_CUDA
    return SETTLED_CPU


class MemoryTracker:
    """`devices`: every device a split model occupies (default: `device` alone). Each GPU is tracked on its own;
    with several, the result's figures are their sums and `per_device` holds each one's."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005, nvml: NvmlProbe | None = None,
                 settle_first: bool = False, devices: tuple[torch.device, ...] = (), pid: int | None = None):
        self.device = torch.device(device)
        self.devices = tuple(torch.device(d) for d in devices) or (self.device,)
        self.interval_s = interval_s
        self.gpus = tuple(d for d in self.devices if d.type == "cuda")
        self.nvml = {d: nvml if nvml is not None and d == self.device else NvmlProbe(d) for d in self.gpus}
        self.settle_first = settle_first
        self.pid = pid  # another process whose tree's RSS is the one that counts (a runtime's server)
        self.result: MemoryResult | None = None

    def __enter__(self) -> "MemoryTracker":
        self._start_state = settle(self.device, self.devices) if self.settle_first else None
        self._cuda_start: dict[torch.device, dict] = {}
        for device in self.gpus:
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self._cuda_start[device] = dict(
                allocated_start_bytes=torch.cuda.memory_allocated(device),
                reserved_start_bytes=torch.cuda.memory_reserved(device),
                nvml_device_used_start_bytes=self.nvml[device].device_used(),
            )
        self._rss_start = rss_bytes(self.pid)
        self._sampler = _PeakSampler(self.interval_s, self.nvml, self.pid)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            for device in self.gpus:
                synchronize(device)
        self._sampler.finish()
        self.result = self._result()
        return False

    def _result(self) -> MemoryResult:
        s = self._sampler
        rss_end = rss_bytes(self.pid)
        common = dict(
            rss_of=None if self.pid is None else f"the server's process tree (pid {self.pid} and its children)",
            device=str(self.device),
            rss_start_bytes=self._rss_start,
            rss_end_bytes=rss_end,
            rss_peak_bytes=max(s.rss_peak, rss_end),
            start_state=self._start_state,
            samples=s.samples,
        )
        if not self.gpus:
            return MemoryResult(**common)
        each = [DeviceMemory(device=str(d), **self._cuda_figures(d)) for d in self.gpus]
        notes = tuple(dict.fromkeys(n for d in self.gpus for n in (self.nvml[d].unavailable, self.nvml[d].process_unknown) if n))
        if len(each) == 1:
            return MemoryResult(**common, **each[0].model_dump(exclude={"device"}), notes=notes)
        summed = {name: _sum(getattr(e, name) for e in each) for name in DeviceMemory.model_fields if name.endswith("_bytes")}
        bases = {e.nvml_process_basis for e in each}
        return MemoryResult(**common, **summed, nvml_process_basis=bases.pop() if len(bases) == 1 else None,
                            per_device=tuple(each),
                            notes=(*notes, SUMMED.format(devices=", ".join(e.device for e in each))))

    def _cuda_figures(self, device: torch.device) -> dict:
        s, probe = self._sampler, self.nvml[device]
        return dict(
            **self._cuda_start[device],
            allocated_end_bytes=torch.cuda.memory_allocated(device),
            allocated_peak_bytes=torch.cuda.max_memory_allocated(device),
            reserved_end_bytes=torch.cuda.memory_reserved(device),
            reserved_peak_bytes=torch.cuda.max_memory_reserved(device),
            nvml_device_used_end_bytes=probe.device_used(),
            nvml_device_used_peak_bytes=s.device_peak[device],
            nvml_process_used_peak_bytes=s.process_peak[device],
            nvml_process_basis=probe.process_basis if s.process_peak[device] is not None else None,
        )


def _sum(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)
