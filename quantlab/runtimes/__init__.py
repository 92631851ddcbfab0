"""Runtimes: how a model is loaded and run for prefill and decode. One module each, registered by name here, on the
interface of base.py (Runtime, LoadRequest, LoadedModel); the measurement loop (quantlab/measure.py) is shared. A
recipe picks one with `measure.runtime`.

A runtime module is imported when it is first asked for, so that naming the runtimes costs nothing. Each entry
says what the runtime loads: "checkpoint" (a Hugging Face folder, quantized or not) or "gguf" (a GGUF file); a
method says which of the two it makes (Method.makes), and the recipe pairs them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeEntry:
    module: str
    cls: str
    loads: tuple[str, ...]  # "checkpoint" and/or "gguf"
    own_process: bool = False  # runs the model in a process of its own: it loads only what a method wrote to disk
    quality_from: str | None = None  # what quality scores when not the full logits (a server's top-k log-probs)
    speculative: str | None = None  # how it runs MTP speculative decoding; None: it cannot


RUNTIMES = {
    "transformers": RuntimeEntry("quantlab.runtimes.transformers", "TransformersRuntime", ("checkpoint",)),
    "llama.cpp": RuntimeEntry("quantlab.runtimes.libllama", "LlamaCppRuntime", ("gguf",),
                              speculative="llama.cpp's llama-speculative-simple --spec-type draft-mtp"),
    "vllm": RuntimeEntry("quantlab.runtimes.vllm", "VllmRuntime", ("checkpoint",), own_process=True,
                         quality_from="vLLM's top-20 prompt log-probs",
                         speculative="vLLM's --speculative-config method mtp"),
}
RUNTIME_NAMES = tuple(RUNTIMES)


def runtime_for(name: str):
    entry = RUNTIMES[name]
    return getattr(importlib.import_module(entry.module), entry.cls)()
