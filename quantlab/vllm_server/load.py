"""Serving under load, from quantlab's own client: at each concurrency level, N requests of seeded random prompts
(distinct, so that no prefix cache helps), at most `concurrency` in flight, each streamed; reported as `vllm bench
serve` reports it (TTFT, inter-token latency, time per output token, request and token throughput).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from quantlab.schema.serving import ServingLevel
from quantlab.vllm_server.client import VllmClient


@dataclass(frozen=True)
class LoadSettings:
    concurrency: int
    requests: int
    input_tokens: int
    output_tokens: int
    vocab_size: int
    seed: int = 0


@dataclass(frozen=True)
class _Timed:
    sent: float
    arrivals: tuple[float, ...]  # one per token
    error: str | None = None


def prompts(settings: LoadSettings) -> list[list[int]]:
    rng = random.Random(f"{settings.seed}-{settings.concurrency}")
    return [[rng.randrange(settings.vocab_size) for _ in range(settings.input_tokens)] for _ in range(settings.requests)]


def run_level(client: VllmClient, settings: LoadSettings) -> ServingLevel:
    """One concurrency level; a request that fails is counted, and the first failure quoted."""
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
        timed = list(pool.map(lambda prompt: _one(client, prompt, settings.output_tokens), prompts(settings)))
    duration = max((t.arrivals[-1] for t in timed if t.arrivals), default=time.perf_counter()) - began
    return summarize(settings, timed, duration)


def _one(client: VllmClient, prompt: list[int], output_tokens: int) -> _Timed:
    stream = client.stream(prompt, output_tokens)
    arrivals: list[float] = []
    try:
        when, ids = stream.first_token(client.timeout_s)
        arrivals += [when] * len(ids)
        for when, ids in stream.rest(client.timeout_s):
            arrivals += [when] * len(ids)
    except Exception as exc:  # a failed request is a finding of the load test, not the end of it
        return _Timed(stream.sent_at, tuple(arrivals), f"{type(exc).__name__}: {exc}"[:300])
    return _Timed(stream.sent_at, tuple(arrivals))


def summarize(settings: LoadSettings, timed: list[_Timed], duration_s: float) -> ServingLevel:
    done = [t for t in timed if t.error is None and len(t.arrivals) == settings.output_tokens]
    ttft = [1000 * (t.arrivals[0] - t.sent) for t in done]
    itl = [1000 * gap for t in done for gap in np.diff(t.arrivals)]
    tpot = [1000 * (t.arrivals[-1] - t.arrivals[0]) / (len(t.arrivals) - 1) for t in done if len(t.arrivals) > 1]
    errors = [t.error for t in timed if t.error]
    duration_s = max(duration_s, 1e-9)
    return ServingLevel(
        concurrency=settings.concurrency, requests=len(timed), completed=len(done), failed=len(timed) - len(done),
        input_tokens=settings.input_tokens, output_tokens=settings.output_tokens, duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        output_throughput=sum(len(t.arrivals) for t in done) / duration_s,
        total_token_throughput=sum(len(t.arrivals) + settings.input_tokens for t in done) / duration_s,
        ttft_ms_mean=_mean(ttft), ttft_ms_p50=_pct(ttft, 50), ttft_ms_p99=_pct(ttft, 99),
        itl_ms_mean=_mean(itl), itl_ms_p50=_pct(itl, 50), itl_ms_p99=_pct(itl, 99), tpot_ms_mean=_mean(tpot),
        first_error=errors[0] if errors else None)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def describe_level(level: ServingLevel) -> str:
    """One line per level, for the terminal."""
    head = (f"serving at concurrency {level.concurrency:>3}: {level.completed}/{level.requests} requests, "
            f"{level.output_throughput:,.1f} output tok/s, {level.request_throughput:,.2f} req/s")
    if level.ttft_ms_p50 is None:
        return f"{head}; none completed ({level.first_error})"
    return (f"{head}, TTFT p50 {level.ttft_ms_p50:,.0f} ms p99 {level.ttft_ms_p99:,.0f} ms, "
            f"ITL p50 {level.itl_ms_p50:,.1f} ms p99 {level.itl_ms_p99:,.1f} ms"
            + (f"; {level.failed} failed: {level.first_error}" if level.failed else ""))
