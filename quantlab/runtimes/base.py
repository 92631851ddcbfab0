"""The runtime interface: every hook the measurement loop, runs, builds and quality call on a runtime, declared
here, with the two that a runtime may leave alone (`prepare_point`, `point_buffers`) given their defaults. A
runtime is one module with one `Runtime` subclass, plus one line in the registry (`quantlab/runtimes/__init__.py`).

What to load travels as a `LoadRequest`, typed: the model source, the device and the split, the method's extra
`from_pretrained` arguments, the GGUF file, and the runtime's own settings (from its `options` hook). The result
is a `LoadedModel`, the same for every runtime.

Runtimes import neither the recipe nor the methods: the recipe's measure section reaches `options` as it is, and
a method's arguments reach `load` inside the request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantlab.device_map import DeviceSplit
from quantlab.schema.environment import WeightsInfo
from quantlab.schema.measurement import Kernels
from quantlab.schema.serving import ServingLevel
from quantlab.schema.speculative import SpeculativeResult, SpeculativeSpec


@dataclass
class LoadedModel:
    """A loaded model as every runtime returns it: the runtime's own model object, its tokenizer (None where the
    runtime has its own vocabulary), the model's config, and what the record says of the weights."""

    model: Any
    tokenizer: Any | None
    config: Any
    info: WeightsInfo


@dataclass(frozen=True)
class LoadRequest:
    """What a runtime loads, and how.

    `source`: the model source (quantlab.sources.ModelSource: its spec, config, files, tokenizer, fingerprint).
    `from_pretrained`: the method's extra from_pretrained arguments (bitsandbytes' quantization_config); only the
    transformers runtime reads them. `gguf`: the GGUF file the llama.cpp runtime loads. `settings`: the runtime's own
    settings, as its `options` hook made them from the recipe's measure section."""

    source: Any
    device: torch.device
    split: DeviceSplit | None = None
    from_pretrained: Mapping[str, Any] = field(default_factory=dict)
    gguf: Path | None = None
    settings: Any = None


@dataclass(frozen=True)
class SpeculativeRequest:
    """What the speculative-decoding measurement decodes: the same text prompts, as token ids and as text (a runtime
    whose own tool tokenizes takes the text), each with speculative decoding off and then on for every k."""

    spec: SpeculativeSpec
    prompt_ids: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]
    new_tokens: int
    seed: int


class Runtime(ABC):
    """One way to load and run a model for prefill and decode. `model` below is whatever `load` put in
    LoadedModel.model; `cache` is whatever `prefill` returned beside the first tokens."""

    name: str

    def options(self, measure: Any, device: torch.device, longest: int = 0) -> Any:
        """The runtime's settings from the recipe's measure section (None: it has none). `longest`: the longest
        sequence the run will send, quality's windows included (a server sizes its model length by it)."""
        return None

    @abstractmethod
    def load(self, request: LoadRequest) -> LoadedModel: ...

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def settings(self, model: Any) -> dict[str, Any]:
        """The settings that ran, as records state them."""

    def close(self, model: Any) -> None:
        """After the last point: a runtime that runs a server stops it here. Default: nothing to close."""

    def memory_pid(self, model: Any) -> int | None:
        """The process whose tree's RSS the memory trackers sample: a runtime that runs the model in a server
        process names it. Default: None, this process."""
        return None

    def serving(self, model: Any, seed: int, echo: Callable[[str], None]) -> tuple[ServingLevel, ...] | None:
        """Serving under load, once per run, where the runtime is a server. Default: None (not a server)."""
        return None

    def speculative(self, model: Any, request: SpeculativeRequest,
                    echo: Callable[[str], None]) -> tuple[SpeculativeResult, ...]:
        """MTP speculative decoding off and on, per k, in the runtime's own way (a runtime that can declares how in
        its registry entry, and the recipe refuses the others before this is reached)."""
        raise NotImplementedError(f"the {self.name} runtime does not run speculative decoding")

    def scorer(self, model: Any) -> Any:
        """What quality scores: the model itself (a torch module whose logits it reads), or a
        quantlab.quality.top_k.TopKScorer where the runtime returns only top-k log-probs. Default: the model."""
        return model

    def prepare_point(self, model: Any, context: int, batch: int, new_tokens: int) -> None:
        """Before one (context, batch) point, outside the timing: a runtime that allocates its cache whole
        (llama.cpp's context) makes it here. Default: nothing to prepare."""

    @abstractmethod
    def prefill(self, model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One pass over the prompt: (the next token per sequence, as a (batch, 1) tensor; the cache)."""

    @abstractmethod
    def decode(self, model: Any, next_ids: torch.Tensor, cache: Any, steps: int) -> torch.Tensor:
        """`steps` greedy tokens after `next_ids`: a (batch, steps + 1) tensor of token ids."""

    def timed_phases(self, cache: Any) -> tuple[float, float] | None:
        """(prefill seconds, decode seconds) as the runtime timed them itself, where the loop's own timers cannot
        see them: a server streams tokens while the loop waits, so their arrival times are the measurement.
        Default: None, the loop's timers."""
        return None

    @abstractmethod
    def cache_bytes(self, cache: Any) -> int | None:
        """Bytes the cache holds; None where the runtime accounts for it in `point_buffers` instead."""

    def point_buffers(self, model: Any) -> dict[str, int] | None:
        """The runtime's own accounting of its buffers at this point ("CPU KV" -> bytes). Default: none."""
        return None

    @abstractmethod
    def vocab_size(self, model: Any) -> int: ...

    @abstractmethod
    def weight_bytes(self, model: Any) -> int: ...

    @abstractmethod
    def parameter_count(self, model: Any) -> int: ...

    @abstractmethod
    def lookup_table_bytes(self, model: Any) -> int:
        """Bytes of the input embedding table, which a decode step reads one row of (0 when tied to lm_head)."""

    @abstractmethod
    def kernels(self, model: Any) -> Kernels:
        """The kernels and dtype that really ran."""
