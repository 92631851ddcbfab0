"""The engine-neutral AWQ interface: a job in, a folder of `quant_method: awq` GEMM shards out.

An engine reads the source checkpoint (or creates synthetic weights), quantizes, and writes the
safetensors shards into `job.out`. Everything around it is shared and engine-independent: the
recipe, the calibration samples, the skip rules, config.json's quantization_config, the build
folder, measurement and records. Engines register in ENGINES (quantize/awq/__init__.py): each has a `name`,
`check(params, config)` (raise QuantlabError before any weights load when it cannot quantize
the model) and `quantize(job) -> AwqOutcome` (write the shards, not config.json, into job.out).

The MTP head (`mtp.*`) is not an engine's to write into its shards: by default the build copies it from the
source. An engine asked to quantize it (`AwqParams.mtp`) writes the head's tensors, packed Linears and norms, as a
checkpoint of their own into `job.out / MTP_STAGED`; the method moves them into the build's MTP shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import PretrainedConfig


MTP_STAGED = ".mtp-staged"  # the folder inside job.out where an engine that quantizes the MTP head writes it


@dataclass(frozen=True)
class AwqParams:
    """What an engine needs of a recipe's AWQ section (quantlab.methods.awq.AwqConfig makes it), and the class of
    the model it quantizes. Engines take these, not the recipe's config: they sit on a floor below the methods."""

    model_class: str  # the checkpoint's HF class, e.g. Qwen3_5ForConditionalGeneration
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    clip: bool = True  # search a clipping threshold per group after the scales
    batch_size: int = 8  # calibration windows per forward pass
    skip_classes: tuple[str, ...] = ()  # tensor classes kept at the model dtype
    mtp: bool = False  # quantize the MTP head's Linears too (written into MTP_STAGED); False: the build copies it


@dataclass(frozen=True)
class AwqJob:
    source: Path | None  # checkpoint folder; None: synthetic weights (seeded), packed without calibration
    config: PretrainedConfig  # the checkpoint's own config (a vision-language config keeps its tower)
    out: Path
    params: AwqParams
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
