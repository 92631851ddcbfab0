"""Batch-1 decode is memory-bound: each step reads every weight it uses and the whole cache once.

Bytes read per step = the weights minus the input embedding table (a step looks up one row per
sequence, not the table; a tied lm_head reads it whole, so then it counts) + the cache at that
depth (KV of the full-attention layers and the DeltaNet states, as measured after decoding).
The bound is bandwidth / bytes read per step; the record keeps measured / bound.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict

from quantlab.schema.measurement import Roofline


class GpuSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    match: str
    name: str
    bandwidth_gb_s: float
    source: str


@cache
def known_gpus() -> tuple[GpuSpec, ...]:
    text = resources.files("quantlab.data").joinpath("gpus.yaml").read_text()
    return tuple(GpuSpec.model_validate(item) for item in yaml.safe_load(text))


def gpu_spec(device_name: str) -> GpuSpec | None:
    return next((g for g in known_gpus() if re.search(g.match, device_name)), None)


def decode_read_bytes(weight_bytes: int, lookup_table_bytes: int, cache_bytes: int) -> int:
    """Bytes one decode step reads: every weight but the input embedding table (`lookup_table_bytes`, 0 when
    lm_head is that same table) plus the cache at that depth. The run and the estimator both count with this."""
    return weight_bytes - lookup_table_bytes + cache_bytes


def decode_roofline(
    device_name: str, weight_bytes: int, lookup_table_bytes: int, cache_bytes: int, batch: int,
    measured_tokens_per_s: float,
) -> Roofline | None:
    """None when the GPU is not in the table (the record then says so)."""
    spec = gpu_spec(device_name)
    if spec is None:
        return None
    bytes_per_step = decode_read_bytes(weight_bytes, lookup_table_bytes, cache_bytes)
    bound = batch * spec.bandwidth_gb_s * 1e9 / bytes_per_step
    return Roofline(
        gpu=spec.name,
        bandwidth_gb_s=spec.bandwidth_gb_s,
        bandwidth_source=spec.source,
        bytes_per_step=bytes_per_step,
        bound_tokens_per_s=bound,
        fraction_of_bound=measured_tokens_per_s / bound,
        weight_bytes_read=weight_bytes - lookup_table_bytes,
        cache_bytes=cache_bytes,
    )
