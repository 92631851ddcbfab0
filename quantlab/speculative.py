"""Speculative decoding with the MTP head, as a run measures it: the text prompts (real text, since acceptance depends
on what is written, unlike speed and memory), and the one line a run prints per draft length k. The runtimes decode
the prompts with it off and on; quantlab.schema.speculative.summarize turns their counts into a record's entry."""

from __future__ import annotations

import torch

from quantlab.errors import QuantlabError
from quantlab.schema.speculative import SpeculativeResult
from quantlab.text.heldout import default_text


def speculative_prompts(tokenizer, context: int, count: int, seed: int) -> list[tuple[tuple[int, ...], str]]:
    """`count` windows of `context` tokens of the held-out text (seeded, disjoint where the text allows), as token ids
    and as the text they decode to."""
    text = default_text("heldout")
    ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < context:
        raise QuantlabError(f"measure.speculative: {text.label} is {len(ids):,} tokens, shorter than one prompt of "
                            f"{context:,}; measure a smaller context")
    generator = torch.Generator().manual_seed(seed)
    slots = len(ids) // context
    if slots >= count:
        starts = [int(i) * context for i in torch.randperm(slots, generator=generator)[:count]]
    else:
        starts = [int(i) for i in torch.randint(0, len(ids) - context + 1, (count,), generator=generator)]
    windows = [tuple(ids[s:s + context]) for s in starts]
    return [(w, tokenizer.decode(list(w))) for w in windows]


def describe_speculative(r: SpeculativeResult) -> str:
    if r.failed is not None:
        return f"MTP k={r.tokens}: FAILED in the runtime: {r.failed}"
    rate = f"{r.acceptance_rate:.1%}" if r.acceptance_rate is not None else "n/a"
    mean = f"{r.mean_accepted_tokens:.2f}" if r.mean_accepted_tokens is not None else "n/a"
    same = "same greedy tokens" if r.same_tokens else "greedy tokens DIFFER from speculative decoding off"
    return (f"MTP k={r.tokens}: decode {r.decode_tok_s_off:.1f} → {r.decode_tok_s_on:.1f} tok/s ({r.speedup:.2f}×), "
            f"acceptance {rate} ({r.accepted}/{r.drafted}), {mean} tokens per step; {same}")
