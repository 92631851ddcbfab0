"""The quantization cost of a build, from the trackers' results."""

from __future__ import annotations

import re

from quantlab.build.manifest import QuantizeCost
from quantlab.errors import QuantlabError
from quantlab.schema.measurement import MemoryResult

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def quantize_cost(what: str, seconds: float, memory: MemoryResult) -> QuantizeCost:
    return QuantizeCost(
        what=what, device=memory.device, seconds=round(seconds, 3), rss_start_bytes=memory.rss_start_bytes,
        rss_peak_bytes=memory.rss_peak_bytes, gpu_allocated_peak_bytes=memory.allocated_peak_bytes,
        gpu_reserved_peak_bytes=memory.reserved_peak_bytes, nvml_process_peak_bytes=memory.nvml_process_used_peak_bytes,
    )


def cost_summary(cost: QuantizeCost) -> str:
    gpu = ("no GPU" if cost.gpu_allocated_peak_bytes is None
           else f"peak GPU memory {cost.gpu_allocated_peak_bytes / 1e9:,.2f} GB allocated")
    return f"peak host RSS {cost.rss_peak_bytes / 1e9:,.2f} GB, {gpu}"


def parse_size(text: str) -> int:
    """'5GB', '500 MiB' -> bytes (the build spec's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", text, re.I)
    if not match:
        raise QuantlabError(f"build.max_shard_size: {text!r} is not a size like 5GB or 500MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
