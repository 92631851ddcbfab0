"""The report's speculative-decoding section: for each build measured with MTP speculative decoding, by runtime and
draft length k, the acceptance, the tokens per main-model step, the decode speed off and on (one run) and the
speed-up, the draft's memory in the runtime's own accounting, and the build's KL against its reference. Read from
the records only.
"""

from __future__ import annotations

from quantlab.outputs import md_text as md
from quantlab.schema.record import Record


def speculative_section(records: list[Record]) -> list[str]:
    measured = [r for r in records if r.speculative]
    if not measured:
        return []
    latest: dict = {}
    for r in sorted(measured, key=lambda r: r.created_at):
        latest[(r.model.name, r.model.weights, r.hardware.kind, r.runtime.name if r.runtime else "", r.method.label)] = r
    lines = ["## Speculative decoding with the MTP head: what each build keeps of its speed-up", "",
             "Each row: the same text prompts (the held-out corpus) decoded greedily with speculative decoding off and "
             "on, in one run; decode tok/s is the median over the prompts. Acceptance and tokens per step are as the "
             "runtime reports them (its definition is in the record's `how`). The draft's memory is the runtime's own "
             "accounting of what MTP adds. KL: the build's main model against its reference (the record's quality "
             "section), unchanged by speculative decoding, which only changes speed.", "",
             "| Build | Runtime | Device | k | Acceptance | Tokens per step | Decode off tok/s | Decode on tok/s | "
             "Speed-up | Same tokens | Draft memory | KL mean |", "|---|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|"]
    for key, r in sorted(latest.items()):
        lines += [_row(r, s) for s in r.speculative]
    return lines + [""]


def _row(r: Record, s) -> str:
    if s.failed is not None:
        runtime = r.runtime.name if r.runtime else "transformers"
        return (f"| {md(r.model.name)} {md(r.method.label)} ({md(r.model.weights)} weights) | {md(runtime)} | "
                f"{r.hardware.kind.upper()} | {s.tokens} | failed: {md(s.failed[:200])} | — | "
                f"{s.decode_tok_s_off:.1f} | — | — | — | {_memory(s.draft_memory)} | "
                f"{f'{r.quality.kl_mean:.5f}' if r.quality is not None else '—'} |")
    rate = f"{s.acceptance_rate:.1%} ({s.accepted}/{s.drafted})" if s.acceptance_rate is not None else "—"
    mean = f"{s.mean_accepted_tokens:.2f}" if s.mean_accepted_tokens is not None else "—"
    kl = f"{r.quality.kl_mean:.5f}" if r.quality is not None else "—"
    runtime = r.runtime.name if r.runtime else "transformers"
    return (f"| {md(r.model.name)} {md(r.method.label)} ({md(r.model.weights)} weights) | {md(runtime)} | "
            f"{r.hardware.kind.upper()} | {s.tokens} | {rate} | {mean} | {s.decode_tok_s_off:.1f} | "
            f"{s.decode_tok_s_on:.1f} | {s.speedup:.2f}× | {'yes' if s.same_tokens else '**no**'} | "
            f"{_memory(s.draft_memory)} | {kl} |")


def _memory(m) -> str:
    parts = [f"{name} {_mib(value)}" for name, value in (("weights", m.weights), ("KV", m.kv), ("compute", m.compute),
                                                               ("recurrent state", m.recurrent))
             if value is not None]
    if m.kv_tokens is not None:  # a pool shared with the draft: what it takes of it
        parts = [f"KV pool {m.kv_tokens[0]:,} → {m.kv_tokens[1]:,} tokens"
                 + (f" ({_mib(m.kv)} of it)" if m.kv is not None else "")]
    if m.total is not None and not parts:
        parts = [_mib(m.total)]
    return ", ".join(parts) or "—"


def _mib(value: int) -> str:
    return f"{value / 2**20:,.2f} MiB"
