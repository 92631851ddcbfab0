"""The vLLM runtime: a checkpoint folder (BF16, or a quantized one vLLM reads, like quantlab's AWQ builds) served by
vLLM's OpenAI-compatible server from its own venv (.vllm/, `make vllm`), as users run it, and measured over HTTP
by quantlab's own client (quantlab/vllm_server/).

The shared loop (quantlab/measure.py) times each point as for every runtime. Here, a point's sequences are
streamed completions of exactly `new_tokens + 1` greedy tokens (EOS ignored), one request per sequence:
`prefill` returns when every sequence has its first token (the time to first token, as a client sees it: the HTTP
round trip, the queue and the prefill), and `decode` reads the rest of the streams (the decode steps, as they
arrive). The loop repeats one prompt, so prefix caching is off unless measure.vllm.prefix_caching turns it on.

Memory is vLLM's own accounting (its metrics and log: KV bytes and tokens, block size, mamba padding, groups,
maximum concurrency), in every record; the process figures are the RSS of the server's whole process tree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from quantlab.checkpoint import folder_tensors
from quantlab.errors import QuantlabError
from quantlab.quality.top_k import TopKRows, TopKScorer
from quantlab.runtimes.base import LoadedModel, LoadRequest, Runtime, SpeculativeRequest
from quantlab.schema.speculative import DraftMemory, SpeculativeResult, failed, summarize
from quantlab.schema.environment import WeightsInfo
from quantlab.schema.measurement import Kernels
from quantlab.vllm_server.accounting import (
    VllmAccounting, draft_memory, histogram_totals, read_accounting, spec_counters,
)
from quantlab.schema.serving import ServingLevel
from quantlab.vllm_server.client import StreamedCompletion, VllmClient
from quantlab.vllm_server.load import LoadSettings, describe_level, run_level
from quantlab.vllm_server.server import ServerConfig, VllmError, VllmServer, failure_reason, installed_version
from quantlab.vllm_server.settings import VllmSpec

NAME = "vllm"
DECODE_TIME = "vllm:request_decode_time_seconds"  # vLLM's histogram of each request's first-to-last-token time
METRICS_WAIT_S = 10.0
QUALITY_TOP_K = 20  # vLLM's default --max-logprobs: the most log-probs per position it returns
NOT_LOADED = ("mtp.", "visual.", "model.visual.")  # vLLM's text model loads neither the MTP head nor the vision tower


@dataclass(frozen=True)
class VllmSettings:
    spec: VllmSpec
    max_model_len: int
    gpu: bool


@dataclass
class _Point:
    """One repeat of a point in flight: its streams, their first tokens, vLLM's decode-time totals before it, and
    the mean decode time vLLM reported for its requests."""

    streams: list[StreamedCompletion]
    firsts: list[tuple[float, list[int]]]
    before: tuple[float, int]
    decode_s: float = 0.0


@dataclass
class VllmModel:
    """What load returns as the model: the running server, its client, and what vLLM said of itself."""

    server: VllmServer
    client: VllmClient
    config: Any
    settings: VllmSettings
    accounting: VllmAccounting
    tensors: dict = field(default_factory=dict)
    new_tokens: int = 1


class VllmRuntime(Runtime):
    name = NAME

    def options(self, measure, device: torch.device, longest: int = 0) -> VllmSettings:
        """measure.vllm, and vLLM's --max-model-len: measure.vllm.max_model_len, else the longest sequence the run
        sends (a point's context, its new tokens and the first one; a load-test request; a quality window)."""
        spec = measure.vllm or VllmSpec()
        needed = max(longest, max(measure.contexts) + measure.new_tokens + 1, spec.input_tokens + spec.output_tokens + 1)
        return VllmSettings(spec, spec.max_model_len or needed, device.type == "cuda")

    def version(self) -> str:
        return installed_version()

    def settings(self, model: VllmModel) -> dict[str, Any]:
        spec = model.settings.spec
        return {"server": "vllm.entrypoints.openai.api_server (what `vllm serve` runs)",
                "arguments": model.server.config.arguments(model.server.port)[2:],
                "kv_cache_gib": spec.kv_cache_gib, "max_num_seqs": spec.max_num_seqs,
                "max_model_len": model.settings.max_model_len, "prefix_caching": spec.prefix_caching,
                "enforce_eager": spec.enforce_eager, "startup_s": round(model.server.started_s, 1),
                "timing": "TTFT as the client sees it: from the first request sent to the last sequence's first "
                          "token; decode as vLLM's engine timed it: the mean of its per-request decode time "
                          f"({DECODE_TIME}, first token to last) over the point's requests",
                "accounting": model.accounting.as_record()}

    def load(self, request: LoadRequest) -> LoadedModel:
        source = request.source
        folder = source.files(download=source.spec.source == "bundled")  # made on first use (model.mtp, transform)
        if folder is None:
            raise QuantlabError(f"the vLLM runtime serves a checkpoint folder, and {source.name} ({source.spec.source}) "
                                "has none on disk: use a local, bundled or cached Hub model, or a method that writes one")
        tensors = {n: t for n, t in folder_tensors(folder).items() if not n.startswith(NOT_LOADED)}  # before a server
        settings: VllmSettings = request.settings
        spec = settings.spec
        config = ServerConfig(model=str(folder), max_model_len=settings.max_model_len, max_num_seqs=spec.max_num_seqs,
                              kv_cache_gib=spec.kv_cache_gib, dtype=source.spec.dtype, port=spec.port,
                              prefix_caching=spec.prefix_caching, enforce_eager=spec.enforce_eager, gpu=settings.gpu,
                              text_only=hasattr(source.config, "vision_config"))
        server = VllmServer(config, startup_timeout_s=spec.startup_timeout_s)
        server.start()
        try:
            client = VllmClient(server.url, str(folder))
            accounting = read_accounting(server.log_text(), client.metrics())
        except BaseException:
            server.stop()
            raise
        model = VllmModel(server, client, source.config, settings, accounting, tensors)
        info = WeightsInfo(name=source.name, source=source.spec.source, weights=source.weights, location=str(folder),
                           model_class=_architecture(source.config), variant=source.spec.variant,
                           dtype=source.spec.dtype)
        return LoadedModel(model, None, source.config, info)

    def close(self, model: VllmModel) -> None:
        model.server.stop()

    def memory_pid(self, model: VllmModel) -> int | None:
        return model.server.process.pid if model.server.alive() else None

    def serving(self, model: VllmModel, seed: int, echo) -> tuple[ServingLevel, ...] | None:
        spec = model.settings.spec
        if not spec.concurrency:
            return None
        model.client.greedy([1] * spec.input_tokens, 2)  # warm-up, as vllm bench serve sends a test request first
        levels = []
        for concurrency in spec.concurrency:
            level = run_level(model.client, LoadSettings(concurrency, spec.requests_per_level, spec.input_tokens,
                                                         spec.output_tokens, self.vocab_size(model), seed))
            model.server.check_alive()
            echo(describe_level(level))
            levels.append(level)
        return tuple(levels)

    def speculative(self, model: VllmModel, request: SpeculativeRequest, echo) -> tuple[SpeculativeResult, ...]:
        """Each prompt on this server (no draft), then, for each k, on a second server started with the same
        settings and `--speculative-config {"method": "mtp", "num_speculative_tokens": k}`: decode as vLLM's engine
        timed it, its spec-decode counters, and its accounting with the draft against without. A server that fails
        to start or dies while drafting is a finding: its reason, quoted, in the record."""
        off = [self._decode(model.client, model.server, ids, request.new_tokens) for ids in request.prompt_ids]
        context = round(sum(len(ids) for ids in request.prompt_ids) / len(request.prompt_ids))
        results = []
        for k in request.spec.tokens:
            spec = {"method": "mtp", "num_speculative_tokens": k}
            how = (f"vLLM --speculative-config '{json.dumps(spec)}', a second server with this run's settings; decode "
                   f"as vLLM's engine timed it ({DECODE_TIME}), one request at a time, greedy, EOS ignored; drafted "
                   "and accepted: vLLM's counters (vllm:spec_decode_num_draft_tokens, _num_accepted_tokens); tokens "
                   "per step: 1 + accepted ÷ drafts (vllm:spec_decode_num_drafts), vLLM's 'mean acceptance length'")
            config = replace(model.server.config, port=None,
                             extra_args=(*model.server.config.extra_args, "--speculative-config", json.dumps(spec)))
            server = VllmServer(config, startup_timeout_s=model.settings.spec.startup_timeout_s)
            echo(f"speculative decoding: starting vLLM with the MTP draft, k = {k}")
            try:
                server.start()
            except VllmError as exc:
                results.append(failed(k, [s for s, _ in off], str(exc), context, request.new_tokens,
                                      DraftMemory(source="vLLM did not start"), how))
                continue
            try:
                client = VllmClient(server.url, model.client.model)
                drafted_with = read_accounting(server.log_text(), client.metrics())
                memory = draft_memory(model.accounting, drafted_with)
                before = spec_counters(client.metrics())
                on = []
                try:
                    for ids in request.prompt_ids:
                        on.append(self._decode(client, server, ids, request.new_tokens))
                except (VllmError, OSError) as exc:  # OSError: the server shut down between two requests
                    reason = _engine_reason(server, exc)
                    echo(f"vLLM failed with the MTP draft (k = {k}): {reason}")
                    results.append(failed(k, [s for s, _ in off], f"vLLM {installed_version()} served, then failed on "
                                          f"request {len(on) + 1} of {len(request.prompt_ids)}: {reason}", context,
                                          request.new_tokens, memory, how))
                    continue
                drafts, drafted, accepted = (a - b for a, b in zip(spec_counters(client.metrics()), before))
            finally:
                server.stop()
            results.append(summarize(
                k, [s for s, _ in off], [s for s, _ in on], drafted, accepted, 1 + accepted / drafts if drafts else None,
                all(a == b for (_, a), (_, b) in zip(off, on)), context, request.new_tokens, memory, how))
        return tuple(results)

    def _decode(self, client: VllmClient, server: VllmServer, ids: tuple[int, ...], new_tokens: int):
        """(decode tok/s as vLLM's engine timed it, the tokens): one streamed greedy request of new_tokens + 1."""
        before = histogram_totals(client.metrics(), DECODE_TIME)
        stream = client.stream(list(ids), new_tokens + 1)
        _, first = _or_server_died(server, stream.first_token, client.timeout_s)
        tokens = list(first) + [i for _, chunk in _or_server_died(server, stream.rest, client.timeout_s) for i in chunk]
        if len(tokens) != new_tokens + 1:
            raise VllmError(f"vLLM returned {len(tokens)} tokens, not the {new_tokens + 1} asked for")
        deadline = time.monotonic() + METRICS_WAIT_S
        while True:
            total, count = histogram_totals(client.metrics(), DECODE_TIME)
            if count > before[1]:
                return new_tokens / (total - before[0]), tokens
            if time.monotonic() > deadline:
                raise VllmError(f"vLLM's metrics did not count the request ({DECODE_TIME}) after {METRICS_WAIT_S:.0f} s")
            time.sleep(0.01)

    def scorer(self, model: VllmModel) -> "VllmScorer":
        return VllmScorer(model.client, model.server, min(QUALITY_TOP_K, model.server.config.max_logprobs))

    def prepare_point(self, model: VllmModel, context: int, batch: int, new_tokens: int) -> None:
        if batch > model.settings.spec.max_num_seqs:
            raise QuantlabError(f"batch {batch} is more sequences than vLLM runs at once here "
                                f"(measure.vllm.max_num_seqs {model.settings.spec.max_num_seqs})")
        model.new_tokens = new_tokens

    def prefill(self, model: VllmModel, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        before = histogram_totals(model.client.metrics(), DECODE_TIME)
        streams = [model.client.stream(row.tolist(), model.new_tokens + 1) for row in ids]
        firsts = [self._first(model, s) for s in streams]
        return torch.tensor([[ids_[0]] for _, ids_ in firsts]), _Point(streams, firsts, before)

    def decode(self, model: VllmModel, next_ids: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        streams, firsts = cache.streams, cache.firsts
        rows = []
        for stream, (_, first) in zip(streams, firsts):
            chunks = self._rest(model, stream)
            tokens = list(first) + [i for _, chunk in chunks for i in chunk]
            if len(tokens) != steps + 1:
                raise VllmError(f"vLLM returned {len(tokens)} tokens for a sequence, not the {steps + 1} asked for")
            rows.append(tokens)
        cache.decode_s = self._engine_decode_seconds(model, cache.before, len(streams))
        return torch.tensor(rows)

    def _engine_decode_seconds(self, model: VllmModel, before: tuple[float, int], requests: int) -> float:
        """The mean of vLLM's own decode time (first token to last, in its engine) over the point's requests, read
        from its metrics once it has counted them all."""
        deadline = time.monotonic() + METRICS_WAIT_S
        while True:
            total, count = histogram_totals(model.client.metrics(), DECODE_TIME)
            if count - before[1] >= requests:
                return (total - before[0]) / (count - before[1])
            if time.monotonic() > deadline:
                raise VllmError(f"vLLM's metrics counted {count - before[1]} of {requests} finished requests "
                                f"({DECODE_TIME}) after {METRICS_WAIT_S:.0f} s")
            time.sleep(0.01)

    def timed_phases(self, cache: Any) -> tuple[float, float]:
        """Prefill, as a client sees it: from the first request sent to the last sequence's first token. Decode, as
        vLLM's engine timed it (its metrics): on a small CPU the server's output reaches the client in bursts, so
        the tokens' arrival times cannot time the decode."""
        sent = min(s.sent_at for s in cache.streams)
        return max(s.first_at for s in cache.streams) - sent, cache.decode_s

    def _first(self, model: VllmModel, stream: StreamedCompletion):
        return _or_server_died(model.server, stream.first_token, model.client.timeout_s)

    def _rest(self, model: VllmModel, stream: StreamedCompletion):
        return _or_server_died(model.server, stream.rest, model.client.timeout_s)

    def cache_bytes(self, cache: Any) -> int | None:
        return None  # vLLM allocates its KV space whole at start-up: see point_buffers and the accounting

    def point_buffers(self, model: VllmModel) -> dict[str, int] | None:
        kv = model.accounting.kv_cache_bytes
        return {f"{model.accounting.device or 'CPU'} KV cache (vLLM)": kv} if kv else None

    def vocab_size(self, model: VllmModel) -> int:
        text = getattr(model.config, "text_config", None) or model.config
        return int(text.vocab_size)

    def weight_bytes(self, model: VllmModel) -> int:
        return sum(t.nbytes for t in model.tensors.values())

    def parameter_count(self, model: VllmModel) -> int:
        return sum(_numel(t.shape) for t in model.tensors.values())

    def lookup_table_bytes(self, model: VllmModel) -> int:
        return sum(t.nbytes for n, t in model.tensors.items() if n.endswith("embed_tokens.weight"))

    def kernels(self, model: VllmModel) -> Kernels:
        said = model.accounting.kernels
        deltanet = [k for k in said if "GDN" in k or "mamba" in k.lower()]
        linear = tuple(k for k in said if k not in deltanet) or ("vLLM's unquantized Linear (its log names no kernel)",)
        return Kernels(deltanet={"gated_delta_net": "; ".join(deltanet) or "vLLM (no kernel line in its log)"},
                       linear=linear, attention=f"vLLM {model.accounting.device or ''} attention".replace("  ", " "),
                       compute_dtype=model.server.config.dtype,
                       cpu_backend=None if model.settings.gpu else "vLLM CPU (torch 2.13.0+cpu)")


class VllmScorer(TopKScorer):
    """Quality through vLLM: its prompt log-probs (the top k and the prompt token's own, per position)."""

    label = "vLLM prompt log-probs"

    def __init__(self, client: VllmClient, server: VllmServer, top_k: int):
        self.client, self.server, self.top_k = client, server, top_k

    def score(self, ids: torch.Tensor) -> TopKRows:
        prompt = ids.tolist()
        entries = _or_server_died(self.server, self.client.prompt_logprobs, prompt, self.top_k)[1:]
        top = [sorted(e.items(), key=lambda item: -item[1])[: self.top_k] for e in entries]
        return TopKRows(ids=torch.tensor([[t for t, _ in row] for row in top]),
                        logp=torch.tensor([[lp for _, lp in row] for row in top], dtype=torch.float32),
                        target_logp=torch.tensor([e[t] for e, t in zip(entries, prompt[1:])], dtype=torch.float32))


def _engine_reason(server: VllmServer, exc: Exception, settle_s: float = 3.0) -> str:
    """vLLM's own reason for a request that failed: its engine's last words in the log (they follow the failed
    request by a moment), else what the client saw."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and "EngineDeadError" not in server.log_text():
        time.sleep(0.1)
    time.sleep(0.5)  # the dying worker's own last line can trail vLLM's
    reason = failure_reason(server.log_text())
    return reason if reason and "resource_tracker" not in reason else str(exc)


def _or_server_died(server: VllmServer, read, *args):
    """`read(*args)`; a failed read from a server that has died says so, with vLLM's reason."""
    try:
        return read(*args)
    except VllmError:
        server.check_alive()
        raise


def _architecture(config) -> str:
    names = getattr(config, "architectures", None) or [type(config).__name__]
    return str(names[0])


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count

