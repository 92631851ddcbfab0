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


class Timer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.result: TimingResult | None = None

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        synced = synchronize(self.device) if exc[0] is None else False
        self.result = TimingResult(seconds=time.perf_counter() - self._start, synchronized=synced)
        return False
