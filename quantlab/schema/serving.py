"""Serving under load: one concurrency level of a load test, with the figures `vllm bench serve` prints."""

from __future__ import annotations

from quantlab.schema.bounds import AtLeastOne, Count, NonNegative
from quantlab.schema.frozen import Frozen


class ServingLevel(Frozen):
    """Latencies are None where no request completed (never 0 as a stand-in)."""

    concurrency: AtLeastOne  # requests in flight at once (vllm bench serve --max-concurrency)
    requests: AtLeastOne  # sent
    completed: Count
    failed: Count
    input_tokens: AtLeastOne  # per request
    output_tokens: AtLeastOne  # asked per request (EOS ignored, so each gives exactly this many)
    duration_s: NonNegative  # first request sent to last response done
    request_throughput: NonNegative  # completed requests per second
    output_throughput: NonNegative  # generated tokens per second, all requests
    total_token_throughput: NonNegative  # prompt + generated tokens per second
    ttft_ms_mean: NonNegative | None = None
    ttft_ms_p50: NonNegative | None = None
    ttft_ms_p99: NonNegative | None = None
    itl_ms_mean: NonNegative | None = None  # inter-token latency: the gaps between a stream's tokens, every stream pooled
    itl_ms_p50: NonNegative | None = None
    itl_ms_p99: NonNegative | None = None
    tpot_ms_mean: NonNegative | None = None  # per request: (last token − first token) ÷ (tokens − 1), then averaged
    first_error: str | None = None
