"""The engine-neutral AWQ interface: a job in, a folder of `quant_method: awq` GEMM shards out.

An engine reads the source checkpoint (or creates synthetic weights), quantizes, and writes the
safetensors shards into `job.out`. Everything around it is shared and engine-independent: the
recipe, the calibration samples, the skip rules, config.json's quantization_config, the build
folder, measurement and records. Engines register in ENGINES (quantize/awq/__init__.py): each has a `name`,
`check(qconfig, config, model_class)` (raise QuantlabError before any weights load when it cannot quantize
the model) and `quantize(job) -> AwqOutcome` (write the shards, not config.json, into job.out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from transformers import PretrainedConfig

if TYPE_CHECKING:
    from quantlab.methods.awq import AwqConfig



@dataclass(frozen=True)
class AwqJob:
    source: Path | None  # checkpoint folder; None: synthetic weights (seeded), packed without calibration
    config: PretrainedConfig  # the checkpoint's own config (a vision-language config keeps its tower)
    out: Path
    qconfig: AwqConfig
    calibration: torch.Tensor | None  # [samples, seq_len] token ids; None only with synthetic weights
    device: torch.device
    dtype: torch.dtype
    max_shard_bytes: int
    seed: int = 0
    progress: bool = True
    on_layer: Callable[[int], None] | None = None  # called after each decoder layer is written (benchmarks)
    # Points of the scale and clip grids (search.GRID when None). Not a recipe setting: the searches try the
    # points one after another, so the grid sets the time, not the memory (scripts/bench_awq_memory.py).
    search_grid: int | None = None


@dataclass(frozen=True)
class AwqOutcome:
    engine: str
    quantized: tuple[str, ...]  # Linear module names written as qweight/qzeros/scales
    notes: tuple[str, ...] = ()
