"""The report's runtime sections: vLLM's own accounting and serving under load, for each build vLLM served; then
one build measured by every runtime that ran it (transformers, llama.cpp, vLLM), side by side: speed, memory in
each runtime's own accounting, and KL against the same reference. Read from the records only.
"""

from __future__ import annotations

from collections import defaultdict

from quantlab.outputs import md_text as md
from quantlab.schema.record import Record

VLLM = "vllm"
SIDE_BY_SIDE_BATCH = 1


def runtime_sections(records: list[Record]) -> list[str]:
    return vllm_section(records) + side_by_side_section(records)


def _latest_by(records: list[Record], key) -> dict:
    latest: dict = {}
    for r in sorted(records, key=lambda r: r.created_at):
        latest[key(r)] = r
    return latest


def vllm_section(records: list[Record]) -> list[str]:
    served = [r for r in records if r.runtime and r.runtime.name == VLLM]
    if not served:
        return []
    builds = _latest_by(served, lambda r: (r.model.name, r.model.weights, r.hardware.kind, r.method.label))
    lines = ["## vLLM: its own accounting, and serving under load", "",
             "What vLLM itself reported for each build it served (its `vllm:cache_config_info` metric and its log; "
             "nothing here is estimated), and quantlab's load test: N requests of random prompts at each "
             "concurrency, streamed, reported as `vllm bench serve` reports them. "
             f"{'CPU' if all(r.hardware.kind == 'cpu' for r in served) else 'CPU and GPU'} figures are labelled per row.",
             "", "| Build | Device | KV space | KV tokens | Block | Mamba page padding | Cache groups | Max concurrency "
             "(at max model len) | Weights (vLLM's log) | Kernels vLLM names |", "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for (model, weights, kind, label), r in sorted(builds.items()):
        lines.append(_accounting_row(r))
    lines += ["", "| Build | Device | Concurrency | Requests (failed) | Output tok/s | Requests/s | TTFT p50 / p99 ms | "
              "ITL p50 / p99 ms | TPOT mean ms |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for (model, weights, kind, label), r in sorted(builds.items()):
        lines += [_serving_row(r, level) for level in (r.serving or ())]
    return lines + ["", "ITL is measured between the streamed chunks' arrivals at quantlab's client: tokens that "
                        "arrive in one read count a gap of about 0 ms, as `vllm bench serve` counts them.", ""]


def _build(r: Record) -> str:
    return f"{md(r.model.name)} {md(r.method.label)} ({md(r.model.weights)} weights)"


def _accounting_row(r: Record) -> str:
    a = r.runtime.settings.get("accounting") or {}
    weights = (f"{a['weights_gib']:.3f} GiB loaded" if a.get("weights_gib") is not None
               else f"checkpoint {a['checkpoint_gib']:.2f} GiB" if a.get("checkpoint_gib") is not None else "—")
    return (f"| {_build(r)} | {r.hardware.kind.upper()} | {_gib(a.get('kv_cache_bytes'))} | {_int(a.get('kv_cache_tokens'))} "
            f"| {_int(a.get('block_size'))} | {_pct(a.get('mamba_page_padding_pct'))} | "
            f"{len(a.get('cache_groups') or ())} | {_x(a.get('max_concurrency'))} at {_int(a.get('max_model_len'))} | "
            f"{weights} | {md('; '.join(a.get('kernels') or ())) or '—'} |")


def _serving_row(r: Record, level) -> str:
    def pair(a, b, fmt):
        return "—" if a is None else f"{fmt.format(a)} / {fmt.format(b)}"

    return (f"| {_build(r)} | {r.hardware.kind.upper()} | {level.concurrency} | {level.requests} ({level.failed}) | "
            f"{level.output_throughput:,.1f} | {level.request_throughput:,.2f} | "
            f"{pair(level.ttft_ms_p50, level.ttft_ms_p99, '{:,.0f}')} | {pair(level.itl_ms_p50, level.itl_ms_p99, '{:,.1f}')} "
            f"| {'—' if level.tpot_ms_mean is None else f'{level.tpot_ms_mean:,.1f}'} |")


def build_key(label: str) -> str:
    """One build across runtimes: llama.cpp's BF16 GGUF is the same weights as the BF16 checkpoint."""
    return "BF16" if label in ("BF16", "GGUF BF16") else label


def side_by_side_section(records: list[Record]) -> list[str]:
    points = _latest_by([r for r in records if r.result.status == "ok" and r.point.batch == SIDE_BY_SIDE_BATCH],
                        lambda r: (r.model.name, r.model.weights, r.hardware.kind, build_key(r.method.label),
                                   r.point.context, _runtime(r)))
    runtimes_of: dict[tuple, set[str]] = defaultdict(set)
    for (model, weights, kind, build, context, runtime) in points:
        runtimes_of[(model, weights, kind, build)].add(runtime)
    shared = {k for k, v in runtimes_of.items() if len(v) > 1 and VLLM in v}
    if not shared:
        return []
    lines = ["## One build, three runtimes", "",
             "The same weights measured by each runtime that ran them, at batch 1, each in its own accounting of memory: "
             "transformers, the bytes of its weights and of the cache it held after the last decode step; llama.cpp, "
             "the buffers it logs (model, KV, recurrent state, compute); vLLM, the checkpoint it loaded and the KV space "
             "it allocated whole. KL: against the same BF16 reference, on the same windows (vLLM's from its top-20 "
             "prompt log-probs: a lower bound; llama.cpp's over its own vocabulary pass). Speed: transformers and llama.cpp "
             "in quantlab's own loop around the model; vLLM's TTFT as its HTTP client sees it, its decode as its engine "
             "timed it (vllm:request_decode_time_seconds).", "",
             "| Build | Device | Context | Runtime | Decode tok/s | TTFT ms | Memory (the runtime's own accounting) | KL mean | Top-1 agreement | Measured |",
             "|---|---|--:|---|--:|--:|---|--:|--:|---|"]
    for (model, weights, kind, build, context, runtime), r in sorted(points.items()):
        if (model, weights, kind, build) in shared:
            lines.append(_side_row(r, build, runtime))
    return lines + [""]


def _runtime(r: Record) -> str:
    return r.runtime.name if r.runtime else "transformers"


def _side_row(r: Record, build: str, runtime: str) -> str:
    res, q = r.result, r.quality
    kl = "reference" if q is None and build == "BF16" and runtime == "transformers" else (
        "—" if q is None else f"{q.kl_mean:.5f}{'' if q.kl_exact else ' (≥)'}")
    agree = "—" if q is None else f"{q.top1_agreement:.1%}"
    return (f"| {md(r.model.name)} {md(build)} | {r.hardware.kind.upper()} | {r.point.context:,} | {md(runtime)} | "
            f"{res.decode_tokens_per_s.median:,.1f} | {1000 * res.time_to_first_token_s.median:,.0f} | "
            f"{md(own_memory(r, runtime))} | {kl} | {agree} | {md(str(r.created_at)[:10])} |")


def own_memory(r: Record, runtime: str) -> str:
    if runtime == VLLM:
        a = r.runtime.settings.get("accounting") or {}
        return f"weights {r.weight_bytes / 2**20:,.1f} MiB; KV space {_gib(a.get('kv_cache_bytes'))} ({_int(a.get('kv_cache_tokens'))} tokens)"
    if r.result.runtime_buffers:
        return ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in r.result.runtime_buffers.items())
    cache = r.result.cache_bytes
    return f"weights {r.weight_bytes / 2**20:,.1f} MiB" + ("" if cache is None else f"; cache {cache / 2**20:,.2f} MiB")


def _gib(value) -> str:
    return "—" if value is None else f"{value / 2**30:,.2f} GiB"


def _int(value) -> str:
    return "—" if value is None else f"{value:,}"


def _pct(value) -> str:
    return "none" if value is None else f"{value:.2f}%"


def _x(value) -> str:
    return "—" if value is None else f"{value:,.2f}×"
