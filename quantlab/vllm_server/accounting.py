"""What vLLM says of its own memory, read from what it prints and publishes, never worked out here:

- its metrics (`vllm:cache_config_info`, a gauge whose labels are the engine's CacheConfig after it sized the
  cache): the KV bytes, the KV tokens, the block count, the block size, the maximum concurrency, the prefix-cache
  and mamba-cache modes, the state dtype;
- its log: the mamba page padding ("Padding mamba page size by 91.04% ..."), the cache groups ("kv cache group
  sizes (256, 256, 256, 256)"), the KV line ("CPU KV cache size: 1,525,201 tokens, Maximum concurrency for 4,096
  tokens per request: 372.36x"), the weights (on a GPU "Model loading took 1.2345 GiB memory"; on the CPU only
  "Checkpoint size: 0.01 GiB", to two decimals), and the kernels it names ("Using CPU GDN prefill kernel",
  the linear kernel of a quantized checkpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantlab.schema.speculative import DraftMemory

_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(.*)\}\s+\S+$", re.M)
_PADDING = re.compile(r"Padding mamba page size by ([\d.]+)%")
_GROUPS = re.compile(r"kv cache group sizes \(([\d, ]+)\)")
_KV_LINE = re.compile(r"(CPU|GPU) KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                      r"request: ([\d.,]+)x")
_BLOCK_SET = re.compile(r"Setting attention block size to (\d+) tokens")
_LOADED_GIB = re.compile(r"Model loading took ([\d.]+) GiB")
_CHECKPOINT_GIB = re.compile(r"Checkpoint size: ([\d.]+) GiB")
_KERNEL_LINES = re.compile(r"\] ((?:Using|Selected) [^\n]*(?:kernel|Kernel|LinearMethod|backend)[^\n]*?)\.?$", re.M)
_IGNORED_KERNEL_LINES = ("Using LBHNC KV cache layout", "Using max model len")


@dataclass(frozen=True)
class VllmAccounting:
    """vLLM's own figures for one server. None where vLLM did not print or publish it."""

    kv_cache_bytes: int | None
    kv_cache_tokens: int | None
    num_blocks: int | None
    block_size: int | None
    max_concurrency: float | None  # at max_model_len tokens per request
    max_model_len: int | None
    mamba_page_padding_pct: float | None  # None: vLLM padded nothing (no DeltaNet, or equal pages)
    cache_groups: tuple[int, ...]  # the block size of each KV cache group
    prefix_caching: bool | None
    mamba_cache_mode: str | None
    mamba_ssm_cache_dtype: str | None
    weights_gib: float | None  # "Model loading took ... GiB" (GPU)
    checkpoint_gib: float | None  # "Checkpoint size: ... GiB" (what the CPU path prints; two decimals)
    kernels: tuple[str, ...]
    device: str | None  # "CPU" or "GPU", as vLLM's KV line says

    def as_record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def cache_config_labels(metrics: str) -> dict[str, str]:
    """The labels of `vllm:cache_config_info` in a /metrics page ({} when it is not there)."""
    found = _CACHE_INFO.search(metrics or "")
    return dict(_LABELS.findall(found.group(1))) if found else {}


def read_accounting(log: str, metrics: str = "") -> VllmAccounting:
    labels = cache_config_labels(metrics)
    kv_line = _last(_KV_LINE, log)
    groups = _last(_GROUPS, log)
    return VllmAccounting(
        kv_cache_bytes=_int(labels.get("kv_cache_memory_bytes")),
        kv_cache_tokens=_int(labels.get("kv_cache_size_tokens")) or (_int(kv_line.group(2)) if kv_line else None),
        num_blocks=_int(labels.get("num_gpu_blocks")),
        block_size=_int(labels.get("block_size")) or _int(_group(_last(_BLOCK_SET, log), 1)),
        max_concurrency=_float(labels.get("kv_cache_max_concurrency")) or (_float(kv_line.group(4)) if kv_line else None),
        max_model_len=_int(kv_line.group(3)) if kv_line else None,
        mamba_page_padding_pct=_float(_group(_last(_PADDING, log), 1)),
        cache_groups=tuple(int(g) for g in groups.group(1).replace(" ", "").split(",") if g) if groups else (),
        prefix_caching=_bool(labels.get("enable_prefix_caching")),
        mamba_cache_mode=_none_if_text(labels.get("mamba_cache_mode")),
        mamba_ssm_cache_dtype=_none_if_text(labels.get("mamba_ssm_cache_dtype")),
        weights_gib=_float(_group(_last(_LOADED_GIB, log), 1)),
        checkpoint_gib=_float(_group(_last(_CHECKPOINT_GIB, log), 1)),
        kernels=kernel_lines(log),
        device=kv_line.group(1) if kv_line else None,
    )


def kernel_lines(log: str) -> tuple[str, ...]:
    """The kernels and backends vLLM says it chose, each once, in order."""
    seen: dict[str, None] = {}
    for match in _KERNEL_LINES.finditer(log or ""):
        line = match.group(1).strip()
        if not line.startswith(_IGNORED_KERNEL_LINES):
            seen.setdefault(line, None)
    return tuple(seen)


def _last(pattern: re.Pattern, text: str):
    found = list(pattern.finditer(text or ""))
    return found[-1] if found else None


def _group(match, index: int) -> str | None:
    return match.group(index) if match else None


def _int(text: str | None) -> int | None:
    if text in (None, "", "None"):
        return None
    try:
        return int(float(text.replace(",", "")))
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    if text in (None, "", "None"):
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _bool(text: str | None) -> bool | None:
    return {"True": True, "False": False}.get(text or "")


def _none_if_text(text: str | None) -> str | None:
    return None if text in (None, "", "None") else text


def histogram_totals(metrics: str, name: str) -> tuple[float, int]:
    """(sum, count) of one of vLLM's histograms (e.g. vllm:request_decode_time_seconds), over every label set."""
    total, count = 0.0, 0
    for line in (metrics or "").splitlines():
        if line.startswith(f"{name}_sum{{") or line.startswith(f"{name}_sum "):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count{{") or line.startswith(f"{name}_count "):
            count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")


def spec_counters(metrics: str) -> tuple[int, int, int]:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens), summed over label sets; 0 where
    it publishes none yet."""
    totals = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for line in (metrics or "").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for counter in SPEC_COUNTERS:
            if name in (counter, f"{counter}_total"):
                totals[counter] += float(line.rsplit(" ", 1)[1])
    return tuple(int(totals[c]) for c in SPEC_COUNTERS)


def draft_memory(without: VllmAccounting, with_draft: VllmAccounting) -> DraftMemory:
    """What the MTP draft costs in vLLM's own accounting: the same KV space, shared with the draft's attention
    layer(s), so fewer tokens fit; the bytes are those tokens' worth of the KV space (vLLM's figures, before and
    after). vLLM's CPU path prints no weight figure for the drafter beyond the checkpoint's size."""
    lost = None
    if without.kv_cache_tokens and with_draft.kv_cache_tokens and with_draft.kv_cache_bytes:
        lost = round((without.kv_cache_tokens - with_draft.kv_cache_tokens) / without.kv_cache_tokens
                     * with_draft.kv_cache_bytes)
    tokens = (without.kv_cache_tokens, with_draft.kv_cache_tokens) \
        if without.kv_cache_tokens and with_draft.kv_cache_tokens else None
    return DraftMemory(kv=lost if lost and lost > 0 else None, kv_tokens=tokens, source=(
        f"vLLM's accounting: KV cache {without.kv_cache_tokens:,} tokens without the draft, "
        f"{with_draft.kv_cache_tokens:,} with it (cache groups {list(without.cache_groups)} → "
        f"{list(with_draft.cache_groups)}, mamba padding {without.mamba_page_padding_pct}% → "
        f"{with_draft.mamba_page_padding_pct}%); KV here: the share of the KV space the draft's layer takes")
        if without.kv_cache_tokens and with_draft.kv_cache_tokens else "vLLM printed no KV cache size")
