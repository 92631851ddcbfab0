"""Qwen3.6-27B Q4_K_M at full size with and without llama.cpp's MTP draft (speculative decoding with the model's own
MTP head), at 32k and 128k tokens: llama.cpp's own plan beside quantlab's estimate. No GPU, no 55 GB of RAM: sparse
GGUFs of the real shapes (quantlab/llamacpp/full_size.py).

    .venv/bin/python scripts/mtp_full_size.py [--work DIR] [--out measurements] [--estimate-only]

1. The sparse BF16 GGUF with the MTP head (blk.64), llama-quantize's dry run of Q4_K_M, and a sparse Q4_K_M GGUF of
   the types it chose; the same with the MTP block kept at Q8_0 (--tensor-type 'blk\\.64\\.=q8_0').
2. For each context and K (tokens drafted per step: off, 1, 2, 3 = llama.cpp's default), llama.cpp's plan of the
   contexts llama-server makes (full_size.mtp_plan: no_alloc, nothing allocated): the target context's KV cache,
   DeltaNet state and compute buffer, and the MTP draft context's KV cache and compute buffer. The weights are the
   tensor bytes llama.cpp loads from the GGUF (blk.64 only with the draft on).
3. The largest context whose buffers fit in 24 GiB, with the draft (K = 3) and without, counting every buffer but
   token_embd (which llama.cpp keeps in host memory when the layers are on a GPU): a bisection over the same plans.
4. quantlab's estimate (quantlab/estimate/mtp_draft.py), from the config alone, beside each figure.

Writes measurements/mtp-full-size.json and .md, labelled: synthetic sparse weights, llama.cpp's planned allocation
(CPU backend), not a GPU measurement. About 5 minutes on 2 cores; the work folder holds sparse files (a few MB on disk,
about 90 GB apparent) and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab import fingerprint, llamacpp  # noqa: E402
from quantlab.llamacpp.full_size import mtp_plan, quantized_size, sparse_bf16  # noqa: E402

JSON_NAME = "mtp-full-size.json"
MARKDOWN_NAME = "mtp-full-size.md"
KIND, FILE_TYPE = "Q4_K_M", 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M, for general.file_type
CONTEXTS = (32768, 131072)
DRAFTS = (0, 1, 2, 3)  # K; 3 is llama.cpp's default --spec-draft-n-max (common/common.h:328)
FIT_DRAFT = 3
BUDGET = 24 * 2**30
MTP_BLOCK = "blk.64."
LABEL = ("llama.cpp's allocation plan (no_alloc: nothing allocated) of the contexts llama-server makes with "
         "--spec-type draft-mtp, one slot, for synthetic sparse weights of the real shapes; CPU backend; not a GPU "
         "measurement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "build" / "mtp-full-size"), help="folder under which a work folder for the sparse files is made (and removed)")
    parser.add_argument("--out", default=str(ROOT / "measurements"), help="where the JSON and Markdown go")
    parser.add_argument("--config", default=str(ROOT / "quantlab" / "data" / "qwen3.6-27b"))
    parser.add_argument("--estimate-only", action="store_true",
                        help="keep llama.cpp's plan in the JSON already there; estimate again beside it, rewrite both")
    args = parser.parse_args()
    out = Path(args.out)
    if args.estimate_only:
        data = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
        data["estimate"] = estimate_beside(data)
        write(data, out)
        return
    tools = llamacpp.locate()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mtp-full-size-", dir=args.work))  # its own folder: the one it removes
    start = time.perf_counter()
    vocabulary = ROOT / "quantlab" / "bundled" / "model"  # a stand-in vocabulary: sizes don't change
    bf16 = sparse_bf16(tools, Path(args.config), vocabulary, work, mtp=True)
    q4 = work / "q4_k_m-mtp.gguf"
    q4_q8 = work / "q4_k_m-mtp-q8_0.gguf"
    sizes = {"file_type_rules": quantized_size(tools, bf16, q4, KIND, FILE_TYPE, True),
             "mtp_block_q8_0": quantized_size(tools, bf16, q4_q8, KIND, FILE_TYPE, True,
                                              ["--tensor-type", r"blk\.64\.=q8_0"])}
    weights = {name: loaded_weights(path) for name, path in (("file_type_rules", q4), ("mtp_block_q8_0", q4_q8))}
    print(f"{KIND}: tensors {sizes['file_type_rules'].tensor_bytes:,} B (dry run "
          f"{sizes['file_type_rules'].dry_run_bytes:,} B); blk.64 {weights['file_type_rules']['mtp_block']:,} B, "
          f"kept at Q8_0 {weights['mtp_block_q8_0']['mtp_block']:,} B", flush=True)
    plans = []
    for context in CONTEXTS:
        for k in DRAFTS:
            plan = mtp_plan(tools, q4, context, "f16", k)
            plans.append(plan_entry(plan, weights["file_type_rules"]))
            print(f"{context:>7,} tokens, K={k}: {plans[-1]['total'] / 2**30:6.2f} GiB ({plans[-1]})", flush=True)
    fits = {f"k{k}": largest_fitting(tools, q4, weights["file_type_rules"], k) for k in (0, FIT_DRAFT)}
    print(f"largest context in 24 GiB without token_embd: {fits}", flush=True)
    result = {
        "label": LABEL,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "llama_cpp": tools.version,
        "quantlab_commit": fingerprint.git_state(ROOT)[0],
        "model": "Qwen/Qwen3.6-27B (text model + MTP head; shapes from quantlab/data/qwen3.6-27b/config.json)",
        "weights": "synthetic (sparse: no data), real shapes",
        "type": KIND,
        "settings": {"slots": 1, "n_ubatch": 512, "n_batch": 2048, "flash_attn": "auto", "kv_type": "f16",
                     "draft_kv_type": "f16", "n_outputs_max": "1 + K (target), 1 (draft), as llama-server sets them"},
        "seconds": None,
        "sizes": {name: s.model_dump() for name, s in sizes.items()},
        "weights_loaded": weights,
        "plans": plans,
        "fits_24gib": fits,
        "fit_draft_tokens": FIT_DRAFT,
        "budget_bytes": BUDGET,
    }
    result["estimate"] = estimate_beside(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write(result, out)
    print(f"wrote {out / JSON_NAME} and .md in {result['seconds']:.0f} s")
    shutil.rmtree(work, ignore_errors=True)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / MARKDOWN_NAME).write_text(markdown(result), encoding="utf-8")


def loaded_weights(model: Path) -> dict[str, int]:
    """The tensor bytes llama.cpp loads: the trunk (everything but blk.64), the MTP block, and token_embd (kept in host
    memory on a GPU), from the GGUF's header."""
    from quantlab.llamacpp.gguf_file import read_header

    tensors = read_header(model).tensors
    return {"trunk": sum(t.nbytes for t in tensors if not t.name.startswith(MTP_BLOCK)),
            "mtp_block": sum(t.nbytes for t in tensors if t.name.startswith(MTP_BLOCK)),
            "token_embd": sum(t.nbytes for t in tensors if t.name == "token_embd.weight")}


def plan_entry(plan, weights: dict[str, int]) -> dict:
    t, d = plan.target, plan.draft
    entry = {"context": plan.context, "draft_tokens": plan.draft_tokens, "cells": t.kv_cells,
             "weights": weights["trunk"] + (weights["mtp_block"] if plan.draft_tokens else 0),
             "target_kv": t.kv_bytes, "target_state": t.recurrent_bytes, "target_compute": t.compute_bytes,
             "draft_kv": d.kv_bytes if d else 0, "draft_kv_layers": d.kv_layers if d else 0,
             "draft_compute": d.compute_bytes if d else 0}
    not_bytes = ("context", "draft_tokens", "cells", "draft_kv_layers")
    entry["total"] = sum(v for k, v in entry.items() if k not in not_bytes)
    return entry


def largest_fitting(tools, model: Path, weights: dict[str, int], k: int, limit: int = 262144, step: int = 1024) -> int:
    """The largest context (a multiple of `step`) whose planned buffers, less token_embd, fit 24 GiB: a bisection."""
    low, high = 1, limit // step
    while low < high:
        mid = (low + high + 1) // 2
        entry = plan_entry(mtp_plan(tools, model, mid * step, "f16", k), weights)
        low, high = (mid, high) if entry["total"] - weights["token_embd"] <= BUDGET else (low, mid - 1)
    return low * step


def estimate_beside(r: dict) -> dict:
    """quantlab's estimate (config alone) of each planned figure, and of the largest fitting context."""
    from quantlab.estimate.model import read_estimation_model
    from quantlab.estimate.mtp_draft import (block_bytes, draft_compute_bytes, draft_kv_bytes, longest_context,
                                             mtp_draft, weights_of)
    from quantlab.estimate.runtime import deltanet_state_bytes, kv_bytes_per_token, memory_at, runtime_profile
    from quantlab.estimate.schemes import get_scheme

    model = read_estimation_model("qwen3.6-27b")
    scheme = get_scheme("q4_k_m")
    weights = weights_of(model, scheme)
    rt = runtime_profile("llama.cpp")
    rows = []
    for p in r["plans"]:
        k, context = p["draft_tokens"], p["context"]
        base = memory_at(weights, weights.bytes(False, False), model.shape, context, 1, rt)
        row = {"context": context, "draft_tokens": k,
               "weights": base.weights + base.host_weights,
               "target_kv": round(kv_bytes_per_token(model.shape, rt.kv_dtype) * context),
               "target_state": round(deltanet_state_bytes(model.shape, rt.state_dtype) * (1 + k)),
               "target_compute": base.activations + base.workspace,
               "draft_kv": 0, "draft_compute": 0}
        if k:
            d = mtp_draft(model, weights, scheme, context, k, rt)
            row.update(weights=row["weights"] + d.block_weights, draft_kv=d.draft_kv, draft_compute=d.draft_compute)
        row["total"] = sum(v for key, v in row.items() if key not in ("context", "draft_tokens"))
        rows.append(row)
    fits = {}
    for key, k in (("k0", 0), (f"k{r['fit_draft_tokens']}", r["fit_draft_tokens"])):
        fits[key] = longest_context(model, weights, scheme, r["budget_bytes"], k, rt, on_gpu=False,
                                    minus=weights.component("embed_tokens").bytes)
    q8_block, _ = block_bytes(model, scheme, "Q8_0")
    return {"source": "quantlab/estimate/mtp_draft.py and runtime.py, llama.cpp profile, from the config alone",
            "plans": rows, "fits_24gib": fits, "mtp_block_q8_0": q8_block,
            "draft_kv_formula": [draft_kv_bytes(model.shape, c, "f16") for c in CONTEXTS],
            "draft_compute_formula": [draft_compute_bytes(model.shape, c) for c in CONTEXTS]}


def markdown(r: dict) -> str:
    gib, mib = 2**30, 2**20
    w = r["weights_loaded"]
    lines = [
        "# Qwen3.6-27B Q4_K_M at full size, with and without llama.cpp's MTP draft",
        "",
        f"*{r['label']}. {r['llama_cpp']}; {r['created_at']}. Beside it, quantlab's estimate from the config alone "
        f"({r['estimate']['source']}). Made by `scripts/mtp_full_size.py` in {r['seconds']:.0f} s.*",
        "",
        "## What the MTP draft adds, in llama.cpp's own plan",
        "",
        "One slot, n_ubatch 512, flash attention auto, f16 KV for the target and for the draft (llama.cpp's draft "
        "default, -ctkd/-ctvd). K: tokens drafted per step (--spec-draft-n-max; 0: speculative decoding off, the "
        "MTP block not loaded). Weights: the GGUF's tensor bytes llama.cpp loads (token_embd included; blk.64 only "
        "with the draft on). The other columns are the sizes llama.cpp logs for each context (MiB, two decimals).",
        "",
        "| Context | K | Weights | Target KV | Target DeltaNet state | Target compute | Draft KV | Draft compute "
        "| Total | With the draft, more by |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["plans"]:
        off = next(q for q in r["plans"] if q["context"] == p["context"] and q["draft_tokens"] == 0)
        more = f"{(p['total'] - off['total']) / mib:,.1f} MiB" if p["draft_tokens"] else "—"
        lines.append(f"| {p['context']:,} | {p['draft_tokens']} | {p['weights'] / gib:.3f} GiB | "
                     f"{p['target_kv'] / mib:,.1f} MiB | {p['target_state'] / mib:,.1f} MiB | "
                     f"{p['target_compute'] / mib:,.1f} MiB | {p['draft_kv'] / mib:,.1f} MiB | "
                     f"{p['draft_compute'] / mib:,.1f} MiB | {p['total'] / gib:.3f} GiB | {more} |")
    s = r["sizes"]
    lines += [
        "",
        f"The MTP block (blk.64) at Q4_K_M's own rules: {w['file_type_rules']['mtp_block']:,} B "
        f"({w['file_type_rules']['mtp_block'] / mib:.1f} MiB); kept at Q8_0 (`--tensor-type 'blk\\.64\\.=q8_0'`): "
        f"{w['mtp_block_q8_0']['mtp_block']:,} B ({w['mtp_block_q8_0']['mtp_block'] / mib:.1f} MiB), a file of "
        f"{s['mtp_block_q8_0']['tensor_bytes']:,} B of tensors against {s['file_type_rules']['tensor_bytes']:,} B "
        f"(llama-quantize's dry runs: {s['mtp_block_q8_0']['dry_run_bytes']:,} and "
        f"{s['file_type_rules']['dry_run_bytes']:,} B). Only the weights change with the block's type.",
    ]
    lines += _estimate_lines(r) + _fit_lines(r)
    return "\n".join(lines) + "\n"


def _estimate_lines(r: dict) -> list[str]:
    mib, gib = 2**20, 2**30
    lines = ["", "## quantlab's estimate beside llama.cpp's plan", "",
             "Each part as `quantlab estimate --runtime llama.cpp --mtp-draft K` models it (the MTP rows) and as its "
             "llama.cpp profile models the rest, from the config alone. Difference: estimate − llama.cpp.", "",
             "| Context | K | Part | llama.cpp | Estimate | Difference |", "|---:|---:|---|---:|---:|---:|"]
    parts = (("weights", "weights"), ("target_kv", "target KV"), ("target_state", "target DeltaNet state"),
             ("target_compute", "target compute"), ("draft_kv", "draft KV"), ("draft_compute", "draft compute"),
             ("total", "total"))
    for p, e in zip(r["plans"], r["estimate"]["plans"]):
        for key, name in parts:
            if p["draft_tokens"] == 0 and key.startswith("draft"):
                continue
            unit, label = (gib, "GiB") if key in ("weights", "total") else (mib, "MiB")
            digits = 3 if unit == gib else 1
            diff = e[key] - p[key]
            pct = f" ({100 * diff / p[key]:+.1f}%)" if p[key] else ""
            lines.append(f"| {p['context']:,} | {p['draft_tokens']} | {name} | {p[key] / unit:,.{digits}f} {label} | "
                         f"{e[key] / unit:,.{digits}f} {label} | {diff / unit:+,.{digits}f} {label}{pct} |")
    return lines + _fit_print_note(r)


def _fit_print_note(r: dict) -> list[str]:
    """llama-fit-params' compute buffer for the same file (measurements/gguf-full-size.json), where there is one."""
    path = ROOT / "measurements" / "gguf-full-size.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["allocations"]
    except (OSError, ValueError, KeyError):
        return []
    mib = 2**20
    pairs = []
    for p in r["plans"]:
        a = next((a for a in old if a["type"] == KIND and a["context"] == p["context"] and a["kv_type"] == "f16"
                  and a["slots"] == 1), None)
        if a and p["draft_tokens"] == 0:
            pairs.append(f"{a['compute_bytes'] / mib:,.0f} MiB against {p['target_compute'] / mib:,.0f} MiB at "
                         f"{p['context']:,} tokens")
    if not pairs:
        return []
    return ["", "The target's compute buffer above is planned with llama-server's n_outputs_max (1 + K rows of "
            "logits). llama-fit-params --fit-print leaves n_outputs_max at n_batch and so reserves n_ubatch rows of "
            f"logits (src/llama-context.cpp:250, 670): {'; '.join(pairs)} for the same Q4_K_M file, f16 KV, one slot "
            "(measurements/gguf-full-size.json, llama-fit-params' plan). quantlab's llama.cpp profile "
            "(quantlab/estimate/runtime.py) was held to the fit-print plan, hence its larger target compute here."]


def _fit_lines(r: dict) -> list[str]:
    k = r["fit_draft_tokens"]
    f, e = r["fits_24gib"], r["estimate"]["fits_24gib"]
    embd = r["weights_loaded"]["file_type_rules"]["token_embd"]
    return ["", "## \"A 24 GB GPU runs Q4 with room for context\", with MTP speculative decoding on", "",
            f"Largest context (a multiple of 1,024) whose planned buffers fit in 24 GiB, Q4_K_M, f16 KV, one slot, "
            f"counting every buffer but token_embd ({embd / 2**30:.2f} GiB, which llama.cpp keeps in host memory "
            f"when the layers are on a GPU):", "",
            "| MTP draft | llama.cpp's plan | quantlab's estimate |", "|---|---:|---:|",
            f"| off | {f['k0']:,} tokens | {e['k0']:,} tokens |",
            f"| on, K = {k} | {f[f'k{k}']:,} tokens | {e[f'k{k}']:,} tokens |", "",
            f"The draft costs {f['k0'] - f[f'k{k}']:,} tokens of context in llama.cpp's plan. Not included, because a "
            "CPU plan has none: the CUDA context (about 0.3-0.5 GiB), the cuBLAS workspace, and the CUDA compute "
            "buffers in place of the CPU ones; llama.cpp's `--fit` in this tree does count the draft context "
            "(common/common.cpp:1200-1231, common_fit_extra_model), where llama-fit-params --fit-print does not.", ""]


if __name__ == "__main__":
    main()
