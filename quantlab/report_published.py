"""The report's "published builds" section: each GGUF file or published checkpoint measured, named by its sha256,
with the size its publisher claims (model.claimed_size), its size on disk, llama.cpp's own plan for a GGUF at the
context, and what was measured: decode speed there, and KL against the reference. quantlab's own GGUF builds are
listed too, so that someone else's file and quantlab's build of the same type sit side by side; the sha256 says
whether they are one file. Read from the records only."""

from __future__ import annotations

from quantlab.outputs import md_text as md
from quantlab.schema.record import Record

MIB = 2**20


def published_section(records: list[Record]) -> list[str]:
    measured = [r for r in records if r.file is not None]
    if not measured:
        return []
    latest: dict = {}
    for r in sorted(measured, key=lambda r: r.created_at):
        runtime = r.runtime.name if r.runtime else "transformers"
        latest[(r.file.sha256, r.file.made_by, r.model.name, runtime, r.hardware.kind, r.hardware.name,
                r.point.context)] = r
    lines = ["## Published builds: the claimed size beside the file and the measurement", "",
             "Each row is one GGUF file or published checkpoint (sha256, first 12 hex digits; a checkpoint's is of its "
             "shards' `sha256sum` lines), as measured at one context by one runtime. Claimed: the size its "
             "publisher states (the recipe's `model.claimed_size`). File: its bytes on disk. llama.cpp's plan: "
             "`llama-fit-params --fit-print` at that context (model + context + compute buffers; nothing allocated; its "
             "MiB are rounded down). Decode: median tok/s of the run. KL: against the record's reference. MB = 10⁶ "
             "bytes.", "",
             "| Build | Type | Made by | sha256 | Claimed | File | Δ vs claim | Runtime | Device | Context | "
             "llama.cpp's plan | Decode tok/s | KL mean |", "|---|---|---|---|--:|--:|--:|---|---|--:|--:|--:|--:|"]
    for _, r in sorted(latest.items(), key=lambda item: (item[1].file.name, item[0])):
        lines.append(_row(r))
    return lines + [""]


def _row(r: Record) -> str:
    f = r.file
    claimed = f"{f.claimed_bytes / 1e6:,.1f} MB" if f.claimed_bytes else "—"
    delta = f"{f.bytes / f.claimed_bytes - 1:+.1%}" if f.claimed_bytes else "—"
    plan = (f"{f.plan.total / MIB:,.0f} MiB ({f.plan.kv_type} KV, {', '.join(f.plan.devices)})"
            if f.plan is not None else "—")
    decode = f"{r.result.decode_tokens_per_s.median:,.1f}" if r.result.status == "ok" else md(r.result.status)
    kl = f"{r.quality.kl_mean:.5f}" if r.quality is not None else "—"
    runtime = r.runtime.name if r.runtime else "transformers"
    return (f"| {md(r.model.name)} ({md(r.method.label)}) | {md(f.file_type)} | {md(f.made_by.split(':')[0])} | "
            f"`{f.sha256[:12]}` | {claimed} | {f.bytes / 1e6:,.1f} MB | {delta} | {md(runtime)} | "
            f"{r.hardware.kind.upper()} {md(r.hardware.name)} | {r.point.context:,} | {plan} | {decode} | {kl} |")
