"""Speculative decoding with the model's MTP head: the recipe's `measure.speculative`, typed at the bottom (both
runtimes that run it read it, neither owns it), and what a record says of it, one entry per draft length k."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from quantlab.fields import STRICT
from quantlab.schema.bounds import AtLeastOne, Bytes, Count, NonNegative, Positive, Share
from quantlab.schema.frozen import Frozen

# One MTP layer drafts k tokens by running k times on its own output: llama.cpp's MTP driver and vLLM's proposer
# both do, and neither bounds k below its context (vLLM 0.32.0 started with k = 100 here, a 13,636-token KV pool
# left). The bound is quantlab's: acceptance falls with each drafted position (the bundled head through llama.cpp:
# 83%, 75%, 68% at k = 1, 2, 3) while every step pays for all k, so k past 8 is a typo, not a setting.
MAX_DRAFT_TOKENS = 8


class SpeculativeSpec(BaseModel):
    """measure.speculative: speculative decoding with the model's MTP head, measured on and off in one run."""

    model_config = STRICT

    method: Literal["mtp"] = Field(description="the draft: the model's own MTP head (mtp.* / blk.N.nextn.*)")
    tokens: list[int] = Field(min_length=1, max_length=MAX_DRAFT_TOKENS, description=(
        "k, the tokens drafted per step (llama.cpp --spec-draft-n-max, vLLM num_speculative_tokens): one value or a list, "
        f"each from 1 to {MAX_DRAFT_TOKENS}"))
    prompts: int = Field(4, ge=1, le=256, description="text prompts (the calibration corpus) each measured on and off")

    @field_validator("tokens", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("tokens")
    @classmethod
    def _draft_lengths(cls, values: list[int]) -> list[int]:
        for k in values:
            if k < 1:
                raise ValueError(f"k = {k}: the draft needs at least 1 token per step (k = 0 is speculative "
                                 "decoding off, which every run measures anyway)")
            if k > MAX_DRAFT_TOKENS:
                raise ValueError(f"k = {k}: at most {MAX_DRAFT_TOKENS} tokens per step (quantlab's bound: one MTP "
                                 "layer drafts by running on its own output, and acceptance falls with each position)")
        if len(set(values)) != len(values):
            raise ValueError(f"each k once, got {values}")
        return sorted(values)


class DraftMemory(Frozen):
    """What the draft adds, in the runtime's own accounting (None: the runtime does not report that part)."""

    weights: Bytes | None = None  # the MTP block's weights as loaded
    kv: Bytes | None = None  # the draft's own KV cache
    compute: Bytes | None = None  # the draft's compute buffer
    recurrent: Bytes | None = None  # recurrent state the main model keeps more for drafts (llama.cpp: per drafted position)
    total: Bytes | None = None  # what the runtime reports in all, where it reports only that
    kv_tokens: tuple[Count, Count] | None = None  # a shared KV pool's tokens without and with the draft (vLLM)
    source: str  # where these come from, e.g. "llama.cpp's log of the MTP draft context"


class SpeculativeResult(Frozen):
    """One draft length k: the same prompts decoded greedily with speculative decoding off and on, in one run."""

    method: Literal["mtp"]
    tokens: AtLeastOne  # k
    prompts: AtLeastOne
    context: AtLeastOne  # prompt tokens of each
    new_tokens: AtLeastOne  # generated per prompt
    decode_tok_s_off: Positive  # median over the prompts
    decode_tok_s_on: Positive | None = None  # None only where it failed
    speedup: Positive | None = None  # decode_tok_s_on / decode_tok_s_off
    drafted: Count = 0  # draft tokens proposed, all prompts
    accepted: Count = 0  # of those, accepted by the main model
    acceptance_rate: Share | None = None  # accepted / drafted; None when nothing was drafted
    mean_accepted_tokens: NonNegative | None = None  # tokens per main-model step, the runtime's definition (how)
    same_tokens: bool | None = None  # the greedy tokens with it on equal those with it off; None where it failed
    draft_memory: DraftMemory
    how: str  # the command or config that ran, and how the runtime defines its figures
    failed: str | None = None  # the runtime's own reason, where speculative decoding did not run: a finding

    @model_validator(mode="after")
    def _measured_or_failed(self) -> "SpeculativeResult":
        measured = (self.decode_tok_s_on, self.speedup, self.same_tokens)
        if self.failed is None and None in measured:
            raise ValueError("a speculative result that did not fail has its decode speed, speed-up and tokens")
        if self.failed is not None and any(v is not None for v in measured):
            raise ValueError("a failed speculative result has no speed")
        return self


def summarize(k: int, off_tok_s: list[float], on_tok_s: list[float], drafted: int, accepted: int,
              mean_accepted_tokens: float | None, same_tokens: bool, context: int, new_tokens: int,
              draft_memory: DraftMemory, how: str) -> SpeculativeResult:
    """One k's entry from per-prompt decode speeds (off and on, the same prompts) and the runtime's counts."""
    off, on = _median(off_tok_s), _median(on_tok_s)
    return SpeculativeResult(
        method="mtp", tokens=k, prompts=len(on_tok_s), context=context, new_tokens=new_tokens,
        decode_tok_s_off=off, decode_tok_s_on=on, speedup=on / off, drafted=drafted, accepted=accepted,
        acceptance_rate=accepted / drafted if drafted else None, mean_accepted_tokens=mean_accepted_tokens,
        same_tokens=same_tokens, draft_memory=draft_memory, how=how)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def failed(k: int, off_tok_s: list[float], reason: str, context: int, new_tokens: int, draft_memory: DraftMemory,
           how: str) -> SpeculativeResult:
    """One k that the runtime could not run: its reason, the speed with it off, and what it allocated for the draft
    before it failed."""
    return SpeculativeResult(method="mtp", tokens=k, prompts=len(off_tok_s), context=context, new_tokens=new_tokens,
                             decode_tok_s_off=_median(off_tok_s), draft_memory=draft_memory, how=how, failed=reason)
