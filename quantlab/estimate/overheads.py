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
        m = _fitted_memory(r)
        if m is None or contradiction(r) is not None:
            continue
        share = m.reserved_peak_bytes / m.allocated_peak_bytes - 1
        context = m.nvml_process_used_peak_bytes - m.reserved_peak_bytes
        samples.append((share, context))
    return samples


def _fitted_memory(r: Record):
    """The prefill memory of a GPU record that has every figure the fit needs, else None."""
    m = r.result.prefill_memory if r.hardware.kind == "gpu" and r.result.status == "ok" else None
    if m is None or not (m.allocated_peak_bytes and m.reserved_peak_bytes and m.nvml_process_used_peak_bytes):
        return None
    return m


def contradiction(r: Record) -> str | None:
    """Why a GPU record's memory figures cannot all be true (one would poison the median fit or the check against
    the estimate); None when they agree: allocated <= reserved <= the process's NVML total, and the prefill peak
    at least the weights allocated at load."""
    m = r.result.prefill_memory
    if m is None or not m.allocated_peak_bytes:
        return None
    if m.reserved_peak_bytes and m.reserved_peak_bytes < m.allocated_peak_bytes:
        return "its reserved peak is below its allocated peak"
    nvml, reserved = m.nvml_process_used_peak_bytes, m.reserved_peak_bytes
    if nvml and reserved and nvml < reserved:
        return "its process memory (NVML) is below torch's reserved peak"
    loaded = r.load_memory.allocated_end_bytes
    if loaded and m.allocated_peak_bytes < loaded:
        return "its prefill peak is below the weights allocated at load"
    return None


def skipped_records(records: list[Record]) -> list[str]:
    """One line per GPU record left out of the fit and the checks, and why."""
    return [f"GPU record {r.record_id[:80]}: skipped, {why}" for r in records
            if r.hardware.kind == "gpu" and r.result.status == "ok" and (why := contradiction(r)) is not None]


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
