"""quantlab's HTTP client for vLLM's OpenAI-compatible server: completions over token ids (streamed, so that the
first token and each one after it are timed where they arrive), prompt log-probabilities, and the metrics page.
Standard library only: the server lives in another venv, and this side needs nothing of it.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from quantlab.vllm_server.server import VllmError, error_message, json_request


@dataclass
class StreamedCompletion:
    """One streamed completion, read by a thread of its own: `events` gets (arrival time, token ids) per chunk,
    then (arrival time, None) when the stream ends; `error` is set if it failed."""

    events: "queue.Queue[tuple[float, list[int] | None]]" = field(default_factory=queue.Queue)
    error: BaseException | None = None
    sent_at: float = 0.0
    first_at: float = 0.0  # arrival of the first token
    thread: threading.Thread | None = None

    def first_token(self, timeout: float) -> tuple[float, list[int]]:
        """(arrival time, ids) of the first chunk that carries tokens."""
        while True:
            when, ids = self._next(timeout)
            if ids is None:
                raise VllmError(f"vLLM ended a stream before its first token{self._why()}")
            if ids:
                self.first_at = when
                return when, ids

    def rest(self, timeout: float) -> list[tuple[float, list[int]]]:
        """Every later chunk with tokens, until the stream ends."""
        chunks = []
        while True:
            when, ids = self._next(timeout)
            if ids is None:
                if self.error is not None:
                    raise VllmError(f"a vLLM stream failed{self._why()}")
                return chunks
            if ids:
                chunks.append((when, ids))

    def _next(self, timeout: float):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise VllmError(f"vLLM sent nothing for {timeout:.0f} s") from None

    def _why(self) -> str:
        return f": {self.error}" if self.error else ""


class VllmClient:
    def __init__(self, url: str, model: str, timeout_s: float = 600.0):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        host_port = url.split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)

    def stream(self, prompt: list[int], max_tokens: int) -> StreamedCompletion:
        """Start a greedy completion of exactly `max_tokens` tokens (EOS ignored), streamed, in a thread."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        streamed = StreamedCompletion()
        streamed.thread = threading.Thread(target=self._read_stream, args=(body, streamed), daemon=True)
        streamed.sent_at = time.perf_counter()
        streamed.thread.start()
        return streamed

    def _read_stream(self, body: dict, streamed: StreamedCompletion) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise VllmError(f"vLLM refused the request ({response.status}): {error_message(response.read())}")
            for line in response:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                ids = [i for choice in chunk.get("choices", []) for i in (choice.get("token_ids") or [])]
                streamed.events.put((time.perf_counter(), ids))
        except BaseException as exc:  # handed to the reader: a thread's exception is otherwise lost
            streamed.error = exc
        finally:
            connection.close()
            streamed.events.put((time.perf_counter(), None))

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy token ids, stopping at EOS as users see it."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "return_token_ids": True}
        return list(json_request(f"{self.url}/v1/completions", body, self.timeout_s)["choices"][0]["token_ids"])

    def prompt_logprobs(self, prompt: list[int], top_k: int) -> list[dict[int, float] | None]:
        """vLLM's log-probabilities at each prompt position: the top `top_k` and the prompt's own token, per
        position (None at position 0, which nothing predicts)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_k}
        choice = json_request(f"{self.url}/v1/completions", body, self.timeout_s)["choices"][0]
        return [None if entry is None else {int(token): item["logprob"] for token, item in entry.items()}
                for entry in choice["prompt_logprobs"]]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            return response.read().decode("utf-8", errors="replace")

