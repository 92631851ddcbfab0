"""Handler registry keyed by method: what each quantization method does to a loaded model."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PretrainedConfig

from quantlab.architecture import quantizable_linears
from quantlab.quantize.awq.handler import AwqHandler
from quantlab.quantize.bnb import Bnb4bitHandler, BnbInt8Handler
from quantlab.quantize.configs import NoQuant, QuantConfig, RtnConfig
from quantlab.quantize.rtn import apply_rtn, check_group_size


class Handler(Protocol):
    method: str

    def check(self, qconfig: QuantConfig, config: PretrainedConfig) -> None:
        """Cross-field checks against the model's config; raise QuantlabError. Runs before any load."""

    def label(self, qconfig: QuantConfig, dtype: str) -> str:
        """A short name for tables, e.g. 'BF16' or 'bnb nf4'."""

    def apply(self, model: torch.nn.Module, qconfig: QuantConfig) -> torch.nn.Module:
        """Quantize a loaded model in place (or return a new one)."""

    # Optional: `load_kwargs(qconfig, config) -> dict`, extra from_pretrained arguments for methods
    # that quantize while real weights load (bitsandbytes' quantization_config). Synthetic weights
    # are created from a config, never from_pretrained: `apply` quantizes those. See load_kwargs_for.
    # Optional: `writes_checkpoint = True` (AWQ): the method writes a new checkpoint from the source's
    # files instead of `apply`; `check_source(qconfig, spec, location) -> notes` runs in the plan.


class NoQuantHandler:
    method = "none"

    def check(self, qconfig: NoQuant, config: PretrainedConfig) -> None:
        return None

    def label(self, qconfig: NoQuant, dtype: str) -> str:
        return {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}[dtype]

    def apply(self, model: torch.nn.Module, qconfig: NoQuant) -> torch.nn.Module:
        return model


class RtnHandler:
    """Simulated round-to-nearest: quality moves, memory and speed stay at the model dtype."""

    method = "rtn"

    def check(self, qconfig: RtnConfig, config: PretrainedConfig) -> None:
        from quantlab.plan import meta_model

        model = meta_model(config)
        check_group_size([(n, m.in_features) for n, m in quantizable_linears(model, "rtn")], qconfig.group_size)

    def label(self, qconfig: RtnConfig, dtype: str) -> str:
        return f"RTN int{qconfig.bits} g{qconfig.group_size} (simulated)"

    def apply(self, model: torch.nn.Module, qconfig: RtnConfig) -> torch.nn.Module:
        return apply_rtn(model, qconfig)


HANDLERS: dict[str, Handler] = {h.method: h for h in (NoQuantHandler(), RtnHandler(), BnbInt8Handler(), Bnb4bitHandler(), AwqHandler())}


def handler_for(qconfig: QuantConfig) -> Handler:
    return HANDLERS[qconfig.method]


def load_kwargs_for(qconfig: QuantConfig, config: PretrainedConfig) -> dict:
    """The handler's extra from_pretrained arguments ({} for methods that quantize after loading)."""
    hook = getattr(handler_for(qconfig), "load_kwargs", None)
    return hook(qconfig, config) if hook else {}
