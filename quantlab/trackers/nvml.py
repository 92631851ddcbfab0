"""NVML (nvidia-smi's source of truth): device-used and this-process-used GPU memory.

Without an NVIDIA driver (CPU machines) NVML raises LibraryNotFound; the probe then says so in
`unavailable` and reports nothing, never zeros.
"""

from __future__ import annotations

import os

import torch


class NvmlProbe:
    def __init__(self, device: torch.device):
        self.unavailable: str | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._handle_for(device)
        except Exception as exc:  # NVMLError_LibraryNotFound, ImportError, driver mismatch, ...
            self.unavailable = f"NVML unavailable ({type(exc).__name__}: {exc})"

    def _handle_for(self, device: torch.device):
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        for index in range(self._nvml.nvmlDeviceGetCount()):
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            if uuid.removeprefix("GPU-") in str(self._nvml.nvmlDeviceGetUUID(handle)):
                return handle
        return self._nvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def device_used(self) -> int | None:
        if self._handle is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def process_used(self) -> int | None:
        """This process's GPU memory, CUDA context included; None where the driver hides it."""
        if self._handle is None:
            return None
        for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    def driver_version(self) -> str | None:
        return None if self._handle is None else str(self._nvml.nvmlSystemGetDriverVersion())
