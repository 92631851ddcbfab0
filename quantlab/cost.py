"""The quantization cost of a build, from the trackers' results."""

from __future__ import annotations


from quantlab.schema.build import QuantizeCost
from quantlab.schema.measurement import MemoryResult



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
