"""Handler registry keyed by method: what each quantization method does to a loaded model."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PretrainedConfig

from quantlab.quantize.configs import NoQuant, QuantConfig


class Handler(Protocol):
    method: str

    def check(self, qconfig: QuantConfig, config: PretrainedConfig) -> None:
        """Cross-field checks against the model's config; raise QuantlabError. Runs before any load."""

    def label(self, qconfig: QuantConfig, dtype: str) -> str:
        """A short name for tables, e.g. 'BF16' or 'bnb nf4'."""

    def apply(self, model: torch.nn.Module, qconfig: QuantConfig) -> torch.nn.Module:
        """Quantize a loaded model in place (or return a new one)."""


class NoQuantHandler:
    method = "none"

    def check(self, qconfig: NoQuant, config: PretrainedConfig) -> None:
        return None

    def label(self, qconfig: NoQuant, dtype: str) -> str:
        return {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}[dtype]

    def apply(self, model: torch.nn.Module, qconfig: NoQuant) -> torch.nn.Module:
        return model


HANDLERS: dict[str, Handler] = {h.method: h for h in (NoQuantHandler(),)}


def handler_for(qconfig: QuantConfig) -> Handler:
    return HANDLERS[qconfig.method]
