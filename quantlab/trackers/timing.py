"""Wall-clock timing, synchronised with the GPU so queued kernels are counted."""

from __future__ import annotations

import time
import torch
from quantlab.schema.measurement import TimingResult


def synchronize(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return True
    return False


def synchronize_all(devices: tuple[torch.device, ...]) -> bool:
    return any([synchronize(d) for d in devices])  # a list: every device is synchronised


class Timer:
    """`devices`: every device a split model runs on (default: `device` alone); all are synchronised."""

    def __init__(self, device: torch.device | str = "cpu", devices: tuple[torch.device, ...] = ()):
        self.device = torch.device(device)
        self.devices = tuple(torch.device(d) for d in devices) or (self.device,)
        self.result: TimingResult | None = None

    def __enter__(self) -> "Timer":
        synchronize_all(self.devices)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        synced = synchronize_all(self.devices) if exc[0] is None else False
        self.result = TimingResult(seconds=time.perf_counter() - self._start, synchronized=synced)
        return False
