"""Runtimes: how a model is loaded and run for prefill and decode. One module each, registered by name here;
the measurement loop (quantlab/measure.py) is shared. A recipe picks one with `measure.runtime`.

A runtime module is imported when it is first asked for, so that naming the runtimes costs nothing.
"""

from __future__ import annotations

import importlib

# name -> (module, class): the runtime class is imported on first use
RUNTIMES = {
    "transformers": ("quantlab.runtimes.transformers", "TransformersRuntime"),
    "llama.cpp": ("quantlab.runtimes.libllama", "LlamaCppRuntime"),
}
RUNTIME_NAMES = tuple(RUNTIMES)


def runtime_for(name: str):
    module, cls = RUNTIMES[name]
    return getattr(importlib.import_module(module), cls)()
