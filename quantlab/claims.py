"""The article's claims, and the one way a figure is judged against one.

`article_claims()` is the article's VRAM table (quantlab/data/article_claims.yaml); `claims_data()` what
`quantlab estimate` checks beyond it (estimate_claims.yaml). The report and the estimator both judge with
`judge` and find GPU measurements with `latest_gpu_weights`: one rule, one tolerance. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from quantlab.schema.record import Record


@cache
def article_claims() -> dict[str, Any]:
    return yaml.safe_load(resources.files("quantlab.data").joinpath("article_claims.yaml").read_text())


@cache
def claims_data() -> dict[str, Any]:
    return yaml.safe_load(resources.files("quantlab.data").joinpath("estimate_claims.yaml").read_text())


def tolerance() -> float:
    """A figure within this share of a "~" claim's range counts as matching it."""
    return float(claims_data()["tolerance"])


@dataclass(frozen=True)
class Judgement:
    delta: str  # "inside range", or e.g. "-2.2% vs low end"
    verdict: str  # "matches", "lower than claimed" or "higher than claimed"

    @property
    def text(self) -> str:
        if self.delta == "inside range":
            return f"{self.verdict} (inside the range)"
        return f"{self.verdict} ({self.delta})"


def judge(value: float, low: float, high: float) -> Judgement:
    """`value` against the claimed range [low, high], give or take `tolerance()`."""
    if low <= value <= high:
        return Judgement("inside range", "matches")
    edge = low if value < low else high
    delta = (value - edge) / edge
    verdict = "matches" if abs(delta) <= tolerance() else ("lower than claimed" if delta < 0 else "higher than claimed")
    return Judgement(f"{delta:+.1%} vs {'low' if delta < 0 else 'high'} end", verdict)


def latest_gpu_weights(records: list[Record], model: str, match: dict[str, str]) -> Record | None:
    """The latest GPU record of `model` whose method (and dtype, when the claim names one) is the claim's, with
    its weights measured after load: quantlab's own, or a published GGUF whose header names that model."""
    found = [
        r for r in records
        if (r.model.name == model or (r.file is not None and r.file.model == model))
        and r.hardware.kind == "gpu" and gpu_weight_bytes(r)
        and r.method.name == match["method"] and r.model.dtype == match.get("dtype", r.model.dtype)
        and str(r.method.params.get("type", "")).upper() == str(match.get("type", r.method.params.get("type", ""))).upper()
    ]
    return found[-1] if found else None


def gpu_weight_bytes(r: Record) -> int | None:
    """The weights on the GPU after load: torch's allocated bytes; for llama.cpp, its own CUDA model buffers (torch
    allocates nothing there)."""
    runtime = getattr(r, "runtime", None)  # None in records from before runtimes were recorded
    if runtime is not None and runtime.name == "llama.cpp":
        buffers = r.result.runtime_buffers or {}
        return sum(v for k, v in buffers.items() if k.startswith("CUDA") and k.endswith(" model")) or None
    return r.load_memory.allocated_end_bytes
