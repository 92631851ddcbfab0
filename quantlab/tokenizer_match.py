"""Whether two tokenizers give the same ids, and if not, where they first differ: the vocabulary (its size, a token),
the BPE merges, the added tokens, or the normalizer and pre-tokenizer. KL and perplexity compare two models token by
token, so a candidate and its reference must agree on all of them.

A tokenizer transformers rebuilds from a GGUF header writes "" where one loaded from tokenizer.json has null
(continuing_subword_prefix, end_of_word_suffix); both mean none, so both are read as null.
"""

from __future__ import annotations

import hashlib
import json

PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer")
EMPTY_MEANS_NONE = ("continuing_subword_prefix", "end_of_word_suffix")


def tokenizer_data(tokenizer) -> dict | list:
    """What decides the ids: the backend's model, added tokens, normalizer and pre-tokenizer (or the vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return sorted(tokenizer.get_vocab().items())
    data = json.loads(backend.to_str())
    data = {k: data.get(k) for k in PARTS}
    model = data.get("model")
    if isinstance(model, dict):
        data["model"] = {k: (None if k in EMPTY_MEANS_NONE and v == "" else v) for k, v in model.items()}
    return data


def tokenizer_identity(tokenizer) -> tuple[int, str]:
    """(number of tokens, sha256 of tokenizer_data)."""
    blob = json.dumps(tokenizer_data(tokenizer), sort_keys=True, ensure_ascii=False)
    return len(tokenizer), hashlib.sha256(blob.encode("utf-8")).hexdigest()


def first_difference(a, b, a_name: str, b_name: str) -> str | None:
    """Where tokenizers `a` and `b` first differ, in words; None when they give the same ids."""
    if len(a) != len(b):
        return f"vocabulary: {len(a):,} tokens in {a_name}, {len(b):,} in {b_name}"
    by_id_a = {i: t for t, i in a.get_vocab().items()}
    by_id_b = {i: t for t, i in b.get_vocab().items()}
    for i in sorted(set(by_id_a) | set(by_id_b)):
        if by_id_a.get(i) != by_id_b.get(i):
            return f"vocabulary: token id {i} is {by_id_a.get(i)!r:.40} in {a_name} and {by_id_b.get(i)!r:.40} in {b_name}"
    data_a, data_b = tokenizer_data(a), tokenizer_data(b)
    if data_a == data_b:
        return None
    if not isinstance(data_a, dict) or not isinstance(data_b, dict):
        return "tokenizer: the same vocabulary, but one has no fast tokenizer to compare merges and pre-tokenizer"
    model_a, model_b = data_a.get("model") or {}, data_b.get("model") or {}
    merges_a, merges_b = model_a.get("merges") or [], model_b.get("merges") or []
    if merges_a != merges_b:
        at = next((i for i, (x, y) in enumerate(zip(merges_a, merges_b)) if x != y), min(len(merges_a), len(merges_b)))
        return (f"tokenizer: the same vocabulary, different BPE merges ({len(merges_a):,} in {a_name}, "
                f"{len(merges_b):,} in {b_name}; first difference at merge {at:,})")
    part = next(k for k in PARTS if data_a.get(k) != data_b.get(k))
    what = {"model": "tokenizer model settings", "added_tokens": "added (special) tokens", "normalizer": "normalizer",
            "pre_tokenizer": "pre-tokenizer"}[part]
    return f"tokenizer: the same vocabulary and merges, a different {what}"
