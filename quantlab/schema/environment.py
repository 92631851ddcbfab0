"""What produced a measurement, as data: the hardware, the software, the weights. No torch."""

from __future__ import annotations

from typing import Literal

from quantlab.schema.bounds import AtLeastOne, Bytes
from quantlab.schema.frozen import Frozen


class Hardware(Frozen):
    kind: Literal["gpu", "cpu"]  # what ran the model
    device: str
    name: str  # the GPU's name, or the CPU model on a CPU run
    gpu_memory_bytes: Bytes | None = None
    gpu_driver: str | None = None
    cuda_version: str | None = None
    cpu_model: str
    cpu_cores: AtLeastOne
    ram_bytes: Bytes
    notes: tuple[str, ...] = ()


class Software(Frozen):
    python: str
    platform: str
    quantlab: str
    git_commit: str | None
    git_dirty: bool | None
    packages: dict[str, str]
    torch_threads: AtLeastOne
    # Settings that change what the allocator and the kernels do, as set when the run started
    # (gptqmodel, imported to load AWQ, sets PYTORCH_ALLOC_CONF for later processes' allocators).
    environment: dict[str, str] | None = None


class WeightsInfo(Frozen):
    """What a record says about the weights it measured."""

    name: str  # display name, e.g. "Qwen3.6-27B"
    source: str  # bundled | hub | local | synthetic
    weights: str  # "real" or "synthetic"
    location: str  # hub id, folder, or config used for synthetic weights
    revision: str | None = None  # hub commit, when known
    model_class: str
    variant: str
    dtype: str  # the dtype the model really runs in, read from the loaded model
    requested_dtype: str | None = None  # the recipe's dtype, when the loader changed it (AWQ on CUDA: float16)
