"""CUDA context and allocator overhead: fitted on GPU records when they exist, assumed otherwise.

From each GPU record's prefill memory (the phase with the highest peak):
- allocator overhead = reserved_peak / allocated_peak − 1 (PyTorch's caching-allocator slack);
- CUDA context = NVML process-used peak − reserved_peak (context, cuBLAS workspaces, kernels).
The fit is the median over records. Without records the defaults of the runtime profile stand,
and every output says they are assumptions.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from quantlab.estimate.runtime import RuntimeAssumptions
from quantlab.schema.record import Record


def overhead_samples(records: list[Record]) -> list[tuple[float, int]]:
    """(allocator overhead share, CUDA context bytes) per usable GPU record."""
    samples = []
    for r in records:
        m = r.result.prefill_memory if r.hardware.kind == "gpu" and r.result.status == "ok" else None
        if m is None or not (m.allocated_peak_bytes and m.reserved_peak_bytes and m.nvml_process_used_peak_bytes):
            continue
        share = m.reserved_peak_bytes / m.allocated_peak_bytes - 1
        context = m.nvml_process_used_peak_bytes - m.reserved_peak_bytes
        samples.append((share, context))
    return samples


def calibrate(rt: RuntimeAssumptions, records: list[Record]) -> RuntimeAssumptions:
    """`rt` with its overheads fitted on the records, or unchanged (and marked assumed) without any."""
    samples = overhead_samples(records)
    if not samples:
        return rt
    return replace(
        rt,
        allocator_overhead=max(0.0, statistics.median(s for s, _ in samples)),
        cuda_context_bytes=max(0, round(statistics.median(c for _, c in samples))),
        overheads_source=f"fitted on {len(samples)} GPU record(s)",
    )


def describe_overheads(rt: RuntimeAssumptions) -> str:
    if rt.overheads_source != "assumed":
        how = rt.overheads_source
    elif rt.profile == "transformers":
        how = "assumed, no GPU records to fit them on"
    else:
        how = f"assumed: quantlab's PyTorch records do not describe {rt.profile}"
    return (
        f"CUDA context {rt.cuda_context_bytes / 1e9:.2f} GB, allocator overhead "
        f"{rt.allocator_overhead:.0%} of allocated ({how})"
    )
