"""NVML (nvidia-smi's source of truth): device-used and this-process-used GPU memory.

Without an NVIDIA driver (CPU machines) NVML raises LibraryNotFound; the probe then says so in
`unavailable` and reports nothing, never zeros.

This process's figure is found by PID. Inside a container's PID namespace NVML lists host PIDs,
which never equal `os.getpid()`: then, when NVML lists exactly one compute process, that one is
taken as this process and `process_basis` says so; with several it cannot tell, and reports None
rather than the device-wide figure. The device figure is always labelled as covering every process.
"""

from __future__ import annotations

import os

import torch

PID_MATCH = "this process (NVML PID match)"
SOLE_PROCESS = "the only compute process NVML lists (its PID differs from this process's: PID namespace)"


class NvmlProbe:
    def __init__(self, device: torch.device):
        self.unavailable: str | None = None
        self.process_basis: str | None = None  # how the process figure was found (PID_MATCH, SOLE_PROCESS)
        self.process_unknown: str | None = None  # why it could not be, when it could not
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
        """Device-wide used memory: every process on the GPU, as nvidia-smi's Memory-Usage shows it."""
        if self._handle is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def process_used(self) -> int | None:
        """This process's GPU memory, CUDA context included; None where it cannot be told apart."""
        if self._handle is None:
            return None
        processes = [p for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                     if p.usedGpuMemory is not None]
        used, basis, unknown = process_figure(processes, os.getpid())
        if basis is not None:
            self.process_basis = basis
        elif unknown is not None:
            self.process_unknown = unknown
        return used

    def driver_version(self) -> str | None:
        return None if self._handle is None else str(self._nvml.nvmlSystemGetDriverVersion())


def process_figure(processes, pid: int) -> tuple[int | None, str | None, str | None]:
    """(bytes, basis, why-unknown) for this process among NVML's compute processes."""
    mine = [p for p in processes if p.pid == pid]
    if mine:
        return int(mine[0].usedGpuMemory), PID_MATCH, None
    if len(processes) == 1:
        return int(processes[0].usedGpuMemory), SOLE_PROCESS, None
    if not processes:
        return None, None, None  # nothing allocated yet: not a reason to give up on later samples
    pids = ", ".join(str(p.pid) for p in processes)
    return None, None, (f"NVML lists {len(processes)} compute processes (PIDs {pids}), none with this process's PID "
                        f"{pid}: its own figure cannot be told apart; the device-wide figure covers all of them")
