"""Environment fingerprint: what hardware and software produced a record."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import psutil
import torch

import quantlab
from quantlab.schema.environment import Hardware, Software
from quantlab.trackers.nvml import NvmlProbe

PACKAGES = (
    "torch", "transformers", "accelerate", "safetensors", "huggingface_hub", "tokenizers",
    "bitsandbytes", "gptqmodel", "llmcompressor", "compressed-tensors", "autoawq", "gguf",
    "nvidia-ml-py", "pydantic",
)


ENVIRONMENT = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
               "OMP_NUM_THREADS", "HF_HUB_OFFLINE")


def hardware(device: torch.device) -> Hardware:
    cpu = dict(cpu_model=cpu_model(), cpu_cores=os.cpu_count() or 0, ram_bytes=psutil.virtual_memory().total)
    if device.type != "cuda":
        return Hardware(kind="cpu", device=str(device), name=cpu["cpu_model"], **cpu)
    props = torch.cuda.get_device_properties(device)
    nvml = NvmlProbe(device)
    return Hardware(
        kind="gpu",
        device=str(device),
        name=props.name,
        gpu_memory_bytes=props.total_memory,
        gpu_driver=nvml.driver_version(),
        cuda_version=torch.version.cuda,
        notes=(nvml.unavailable,) if nvml.unavailable else (),
        **cpu,
    )


def software() -> Software:
    commit, dirty = git_state(Path(quantlab.__file__).resolve().parent.parent)
    return Software(
        python=platform.python_version(),
        platform=platform.platform(),
        quantlab=quantlab.__version__,
        git_commit=commit,
        git_dirty=dirty,
        packages=package_versions(),
        torch_threads=torch.get_num_threads(),
        environment={k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
    )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def available_host_ram() -> int:
    """Host RAM free for a run now: the plans' one reading of it (tests replace it)."""
    return psutil.virtual_memory().available


HOST_HEADROOM = 1.2  # activations and allocator slack above the weights, in host RAM


def memory_shortfall(device: torch.device, needed_bytes: int) -> tuple[str, int] | None:
    """Whether `needed_bytes` fit where they will live: ("gpu", its total memory) when they exceed the GPU's,
    ("host", the RAM available) when they and the headroom exceed the host's, None when they fit."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return ("gpu", total) if needed_bytes > total else None
    available = available_host_ram()
    return ("host", available) if needed_bytes * HOST_HEADROOM > available else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """The commit quantlab runs from, and whether its tracked files differ from it."""
    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: `git status` refreshes the index otherwise, writing .git/index.lock in the
            # user's checkout (and failing beside their own git command)
            out = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # a copy of the tree without .git (a GPU box): the commit its sender stated, if any
        stated = os.environ.get("QUANTLAB_GIT_COMMIT")
        dirty = os.environ.get("QUANTLAB_GIT_DIRTY")
        return (stated or None), (None if stated is None or dirty is None else dirty == "1")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))
