"""Measurement records: frozen, self-describing, one per (run, context, batch). Pure data: no torch.

Each record carries everything needed to read it alone: the recipe, the weights (real or
synthetic), the hardware (GPU or CPU), the software, and the results.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from quantlab.schema.quality import QualityResult
from quantlab.schema.bounds import AtLeastOne, Bytes, Count, NonNegative, SmallId
from quantlab.schema.environment import Hardware, Software, WeightsInfo
from quantlab.schema.frozen import Frozen
from quantlab.schema.measurement import Kernels, MemoryResult, PointResult, Roofline
from quantlab.schema.model_file import ModelFile
from quantlab.schema.serving import ServingLevel
from quantlab.schema.speculative import SpeculativeResult
from quantlab.schema.quality_bounds import quality_in_range

SCHEMA_VERSION = 1


class RecipeRef(Frozen):
    name: str
    path: str
    sha256: str
    content: str


class MethodRef(Frozen):
    name: str  # recipe method, e.g. "none"
    label: str  # table label, e.g. "BF16"
    params: dict[str, Any]


class PointRef(Frozen):
    context: AtLeastOne
    batch: AtLeastOne
    new_tokens: AtLeastOne
    warmup: Count
    repeats: AtLeastOne
    seed: SmallId


class SplitRef(Frozen):
    """A model split across devices by accelerate's device map: where each module went, and what that put where."""

    devices: tuple[str, ...]  # GPUs in index order, then "cpu" when offloaded

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(d for d in self.devices if d.startswith("cuda"))
    gpu_names: dict[str, str] = {}  # device -> its GPU's name
    gpu_memory_bytes: dict[str, Bytes] = {}  # device -> its GPU's total memory
    offered_bytes: dict[str, Bytes]  # the recipe's max_memory (or each GPU's free memory for gpus: N)
    weight_bytes_per_device: dict[str, Bytes]  # as accelerate sized them when it made the map
    layers_per_device: dict[str, tuple[Count, ...]]
    device_map: dict[str, str]  # module -> device


class RuntimeRef(Frozen):
    """The runtime that loaded and ran the model, its version and its settings."""

    name: str  # transformers | llama.cpp
    version: str | None = None
    settings: dict[str, object] = {}


class Record(Frozen):
    schema_version: Annotated[int, Field(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    record_id: str
    run_id: str
    created_at: str  # UTC, ISO 8601
    produced_by: str  # e.g. "GPU NVIDIA H200, synthetic weights"
    recipe: RecipeRef
    model: WeightsInfo
    parameters: Count
    weight_bytes: Bytes  # parameters + buffers of the model as measured (after quantization)
    method: MethodRef
    hardware: Hardware
    software: Software
    point: PointRef
    load_seconds: NonNegative
    load_memory: MemoryResult
    result: PointResult
    roofline: Roofline | None = None
    # once per run, against the reference (recipe's quality section)
    quality: Annotated[QualityResult, AfterValidator(quality_in_range)] | None = None
    serving: tuple[ServingLevel, ...] | None = None  # once per run: serving under load (the vLLM runtime)
    speculative: tuple[SpeculativeResult, ...] | None = None  # once per run: MTP speculative decoding, per k
    kernels: Kernels | None = None  # what really ran: DeltaNet functions, quantized Linear classes, dtype
    split: SplitRef | None = None  # a model split across devices; None: one device (hardware.device)
    runtime: RuntimeRef | None = None  # None in records written before runtimes were recorded: transformers
    file: ModelFile | None = None  # the GGUF file measured: its sha256, size, type mix, llama.cpp's plan
    notes: tuple[str, ...] = ()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def produced_by(hardware: Hardware, weights: WeightsInfo, split_devices: tuple[str, ...] = ()) -> str:
    across = f", split across {', '.join(split_devices)}" if len(split_devices) > 1 else ""
    return f"{hardware.kind.upper()} {hardware.name}{across}, {weights.weights} weights"


def record_id(created_at: str, model: str, method: str, context: int, batch: int, run_id: str) -> str:
    stamp = re.sub(r"[^0-9T]", "", created_at.split("+")[0])
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{model}-{method}").strip("-").lower()
    return f"{stamp}Z-{slug}-c{context}-b{batch}-{run_id}"
