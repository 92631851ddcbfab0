"""The recipe's `model:` section: where the weights come from and how they are laid out in memory. Its own floor,
below the recipe: model sources (quantlab/sources.py) are typed by it without importing the recipe, which re-exports
it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from quantlab.fields import STRICT, MemorySize, PathText, RepoId, Revision, Seed
from quantlab.strict_yaml import excerpt

Dtype = Literal["bfloat16", "float16", "float32"]
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_GPUS = 64  # GPUs one split may name


class _Strict(BaseModel):
    model_config = STRICT


class SalientTransform(_Strict):
    """quantlab/salient.py: a few hidden channels' RMSNorm gains × factor and the matching Linear input columns
    ÷ factor; the logits are unchanged, but those channels carry large activations on small weights."""

    channels: int = Field(4, ge=1, le=65536, description="hidden channels made salient (the same in every norm)")
    factor: float = Field(32.0, gt=1, le=2.0**20, description="how much larger those activations become")
    seed: Seed = Field(0, description="which channels: a seeded choice")


class TransformSpec(_Strict):
    """A function-preserving transform of the bundled model's weights, made on first use and cached
    (quantlab/made_sources.py)."""

    salient: SalientTransform


class ModelSpec(_Strict):
    """Where the weights come from, and how they are laid out in memory."""

    source: Literal["bundled", "hub", "local", "synthetic", "gguf"]
    id: RepoId | None = Field(None, description="Hub repo id (source: hub; source: gguf with model.file)")
    revision: Revision | None = Field(None, description="Hub revision (source: hub, or gguf from the Hub)")
    path: PathText | None = Field(None, description="folder of safetensors shards (source: local); the GGUF file "
                                  "(source: gguf)")
    file: PathText | None = Field(None, description="source: gguf from the Hub: the file's name in the repo")
    claimed_size: MemorySize | None = Field(None, description="the size its publisher (card, article) claims, e.g. "
                                            "17GB; the report sets it beside the measured one")
    config: PathText | None = Field(
        None, description="synthetic: 'qwen3.6-27b', 'bundled', or a path to a config.json or its folder"
    )
    transform: TransformSpec | None = Field(
        None, description="bundled: weights transformed from the bundled model's, made on first use and cached"
    )
    mtp: bool = Field(False, description="bundled: the bundled model with its trained MTP head "
                      "(quantlab/bundled/mtp/), joined on first use and cached; the main weights are the same bytes")
    variant: Literal["text", "full"] = "text"
    dtype: Dtype = "bfloat16"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d{1,3})?)$")
    seed: Seed = 0
    # A model split across devices with accelerate's device map (device: auto only): `gpus` takes the first N
    # visible GPUs with all their free memory; `max_memory` says how much of each device to use, as accelerate
    # takes it ({cuda:0: 20GiB, cuda:1: 20GiB}), a `cpu` entry allowing offload to host RAM.
    gpus: int | None = Field(None, ge=1, le=MAX_GPUS, description="split across the first N visible GPUs")
    max_memory: dict[str, MemorySize] | None = Field(
        None, min_length=1, max_length=MAX_GPUS + 1, description="memory per device for the split: cuda:N or cpu"
    )
    awq_kernel: str | None = Field(
        None, max_length=40, description="AWQ checkpoints: the kernel transformers loads them with (its AwqConfig "
        "backend, e.g. gemm_triton, marlin, torch_awq); default: gptqmodel's own choice"
    )

    @model_validator(mode="after")
    def _fields_match_source(self) -> "ModelSpec":
        if self.source == "gguf":
            self._check_gguf()
            return self
        needs = {"hub": "id", "local": "path", "synthetic": "config", "bundled": None}
        required = needs[self.source]
        if self.file is not None:
            raise ValueError(f"model.file names a GGUF in a Hub repo (source: gguf), not used with source '{self.source}'")
        if self.claimed_size is not None and self.source in ("bundled", "synthetic"):
            raise ValueError(f"model.claimed_size is a publisher's claim about a published build; source "
                             f"'{self.source}' is quantlab's own")
        if required and getattr(self, required) is None:
            raise ValueError(f"source '{self.source}' needs model.{required}")
        for name in ("id", "path", "config"):
            if name != required and getattr(self, name) is not None:
                raise ValueError(f"model.{name} is not used with source '{self.source}'; remove it")
        if self.revision is not None and self.source != "hub":
            raise ValueError(f"model.revision is only used with source 'hub', not '{self.source}'")
        if self.transform is not None and self.source != "bundled":
            raise ValueError(f"model.transform is only used with source 'bundled' (it is made from the bundled "
                             f"model's weights), not '{self.source}'")
        if self.mtp and self.source != "bundled":
            raise ValueError(f"model.mtp is only used with source 'bundled' (a checkpoint's own MTP head is found in "
                             f"its files), not '{self.source}'")
        if self.mtp and self.transform is not None:
            raise ValueError("model.mtp and model.transform: give one (the MTP head was trained on the bundled "
                             "model as it is)")
        self._check_split()
        return self

    def _check_gguf(self) -> None:
        if (self.path is None) == (self.id is None):
            raise ValueError("source 'gguf' needs model.path (a GGUF file) or model.id and model.file (a GGUF in a Hub "
                             "repo), one of the two")
        if (self.id is None) != (self.file is None):
            raise ValueError("source 'gguf' from the Hub needs both model.id (the repo) and model.file (its GGUF)")
        if self.revision is not None and self.id is None:
            raise ValueError("model.revision is only used with a GGUF from the Hub (model.id and model.file)")
        for name in ("config", "transform", "gpus", "max_memory", "awq_kernel"):
            if getattr(self, name) is not None:
                raise ValueError(f"model.{name} is not used with source 'gguf' (llama.cpp loads the file as it is)")
        if self.mtp:
            raise ValueError("model.mtp is not used with source 'gguf' (a GGUF's MTP block is found in its header)")
        given = sorted({"variant", "dtype", "device_map"} & self.model_fields_set)
        if given:
            raise ValueError(f"model.{given[0]} is not used with source 'gguf' (llama.cpp runs the file's own tensor "
                             "types); remove it")

    def _check_split(self) -> None:
        if self.gpus is None and self.max_memory is None:
            return
        if self.gpus is not None and self.max_memory is not None:
            raise ValueError("give model.gpus or model.max_memory, not both (gpus: N is max_memory with every "
                             "listed GPU's whole free memory)")
        if self.device != "auto":
            raise ValueError(f"a split across devices needs model.device: auto, not {self.device!r}")
        for key in self.max_memory or {}:
            if not re.fullmatch(r"cuda:(0|[1-9]\d?)|cpu", key):
                raise ValueError(f"model.max_memory: {excerpt(key)} is not a device; write cuda:0, cuda:1, ... or cpu")
        if self.max_memory is not None and set(self.max_memory) == {"cpu"}:
            raise ValueError("model.max_memory names no GPU; list at least one cuda:N (or use device: cpu)")

    @property
    def split(self) -> bool:
        """Whether the model is split across devices with accelerate's device map."""
        return self.gpus is not None or self.max_memory is not None
