"""`quantlab estimate --mtp-draft K`: what llama.cpp's MTP speculative decoding adds to each GGUF method's memory at
each context, and the longest context that fits each GPU size with it on and off (quantlab/estimate/mtp_draft.py).
Prints; writes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.errors import QuantlabError
from quantlab.estimate.command import in_range, parse_numbers
from quantlab.estimate.mtp_draft import (BLOCK_TYPES, DRAFT_KV_TYPES, check_draft_tokens, check_scheme, longest_context,
                                         mtp_draft, mtp_layers, total_without, weights_of)
from quantlab.estimate.model import read_estimation_model
from quantlab.estimate.multi_gpu import check_gpu_gib
from quantlab.estimate.runtime import runtime_profile
from quantlab.estimate.schemes import parse_schemes
from quantlab.recipe import MAX_CONTEXT

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class MtpDraftOptions:
    model: str = "qwen3.6-27b"
    methods: str = "q4_k_m"
    contexts: str = "32768,131072"
    draft_tokens: int = 3  # K: llama.cpp's --spec-draft-n-max default (common/common.h:328)
    kv_dtype: str | None = None  # the target's (--kv-dtype); default f16
    draft_kv_dtype: str = "f16"
    block_type: str | None = None  # keep the MTP block at this ggml type
    state_dtype: str | None = None
    ubatch: int | None = None  # --prefill-chunk: llama.cpp's n_ubatch
    gpu_gb: str = "24"
    batch: int = 1


def check_options(o: MtpDraftOptions) -> tuple[tuple[int, ...], tuple[float, ...], str | None]:
    """Every option checked before any model is read: one line naming the option."""
    check_draft_tokens(o.draft_tokens)
    if o.batch != 1:
        raise QuantlabError(f"--mtp-draft: one slot (llama-server -np 1): --batch must be 1, got {o.batch}")
    contexts = tuple(parse_numbers(o.contexts, "--contexts", int))
    for context in contexts:
        in_range(context, "--contexts", "context", (1, MAX_CONTEXT), " tokens")
    gib = tuple(parse_numbers(o.gpu_gb, "--gpu-gb", float))
    for g in gib:
        check_gpu_gib(g, "--gpu-gb", f"{g:g}")
    if o.draft_kv_dtype not in DRAFT_KV_TYPES:
        raise QuantlabError(f"--draft-kv-dtype {o.draft_kv_dtype}: choose from {', '.join(DRAFT_KV_TYPES)}")
    block = None
    if o.block_type is not None:
        block = o.block_type.upper()
        if block not in BLOCK_TYPES:
            raise QuantlabError(f"--mtp-block-type {o.block_type[:40]}: choose from {', '.join(BLOCK_TYPES)}")
    if o.kv_dtype is not None and o.kv_dtype not in ("fp16", "q8_0", "f32", "bf16"):
        raise QuantlabError(f"--kv-dtype {o.kv_dtype}: llama.cpp's KV cache is f16 (fp16), q8_0, bf16 or f32")
    if o.ubatch is not None:
        in_range(o.ubatch, "--prefill-chunk", "n_ubatch", (1, MAX_CONTEXT), " tokens")
    return contexts, gib, block


def mtp_draft_lines(o: MtpDraftOptions) -> list[str]:
    contexts, gpu_gib, block = check_options(o)
    schemes = parse_schemes(o.methods)
    for scheme in schemes:
        check_scheme(scheme)
    model = read_estimation_model(o.model)
    mtp_layers(model)  # "no MTP head: ..." before any estimate
    rt = runtime_profile("llama.cpp", kv_dtype=o.kv_dtype, state_dtype=o.state_dtype or model.shape.ssm_dtype,
                         prefill_chunk=o.ubatch)
    k = o.draft_tokens
    kv = rt.kv_dtype.replace("fp16", "f16")
    lines = [f"llama.cpp with MTP speculative decoding (--spec-type draft-mtp --spec-draft-n-max {k}), one slot, "
             f"n_ubatch {rt.prefill_chunk}, flash attention on, KV {kv}, draft KV {o.draft_kv_dtype}: {model.name}. "
             "An estimate from the config (quantlab/estimate/mtp_draft.py), not llama.cpp's plan or a measurement."]
    for scheme in schemes:
        weights = weights_of(model, scheme)
        parts = [mtp_draft(model, weights, scheme, c, k, rt, o.draft_kv_dtype, block, rt.prefill_chunk)
                 for c in contexts]
        lines += [""] + _method_lines(model, scheme, weights, parts, rt, block)
        for g in gpu_gib:
            budget = round(g * GIB)
            off = longest_context(model, weights, scheme, budget, 0, rt)
            on = longest_context(model, weights, scheme, budget, k, rt, o.draft_kv_dtype, block)
            lines.append(f"longest context in {g:g} GiB (the GPU total *): {_tokens(off)} without MTP, "
                         f"{_tokens(on)} with the MTP draft ({_tokens_change(on - off)})")
    return lines


def _method_lines(model, scheme, weights, parts, rt, block) -> list[str]:
    first = parts[0]
    params = sum(n for _, n in first.block_formats)
    mix = ", ".join(f"{t} {100 * n / params:.0f}%" for t, n in first.block_formats)
    at = f"kept at {block}" if block else "at the file type's own rules"
    width, label_width = 14, 46
    lines = [f"{scheme.label}: MTP block {at} ({mix})",
             f"{'tokens of context':{label_width}}" + "".join(f"{p.context:>{width},}" for p in parts)]

    def row(label: str, values: list[int]) -> str:
        return f"{label:{label_width}}" + "".join(f"{_size(v):>{width}}" for v in values)

    for i, (label, _) in enumerate(first.rows()):
        lines.append(row(label, [p.rows()[i][1] for p in parts]))
    lines.append(row("MTP draft in all", [p.total for p in parts]))
    cpu = [total_without(model, weights, p.context, rt, on_gpu=False) for p in parts]
    gpu = [total_without(model, weights, p.context, rt) for p in parts]
    lines += [row("total without MTP, every buffer (CPU backend)", cpu),
              row("total with MTP, every buffer (CPU backend)", [w + p.total for w, p in zip(cpu, parts)]),
              row("total without MTP on a GPU *", gpu),
              row("total with MTP on a GPU *", [w + p.total for w, p in zip(gpu, parts)]),
              f"* token_embd in host memory, as llama.cpp keeps it; {rt.cuda_context_bytes / 1e9:.2f} GB of CUDA "
              "context assumed"]
    return lines


def _size(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB" if n >= 100 * MIB else f"{n / MIB:.2f} MiB"


def _tokens(n: int) -> str:
    return f"{n:,} tokens" if n else "not even 1 token"


def _tokens_change(delta: int) -> str:
    return "no change" if delta == 0 else f"{delta:+,} tokens"
