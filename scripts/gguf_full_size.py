"""The article's GGUF table at full size, without a GPU and without 55 GB of RAM: Qwen3.6-27B's exact tensor shapes,
synthetic (sparse) weights, and llama.cpp's own answers (quantlab/llamacpp/full_size.py says how).

    .venv/bin/python scripts/gguf_full_size.py [--work DIR] [--out measurements]

Writes measurements/gguf-full-size.json and .md: file sizes per type with and without the MTP head, beside the
published files; llama.cpp's planned buffers (model, context = KV + recurrent state, compute) at 4k-262k tokens,
f16 and q8_0 KV cache, 1 and 4 slots; the largest context whose buffers fit in 24 GiB. Labelled for what they
are: llama.cpp's allocation plan (no_alloc) for synthetic weights of the real shapes, CPU backend, no GPU.
About 3 minutes on 2 cores; the work folder holds sparse files (about 10 MB on disk, 200 GB apparent).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantlab import fingerprint, llamacpp  # noqa: E402
from quantlab.llamacpp.full_size import (  # noqa: E402
    FIT_PRINT_BUFFERS, largest_fitting_context, planned_allocation, quantized_size, sparse_bf16, tensor_bytes,
)
from quantlab.schema.bench import GGUF_FULL_SIZE_NAME, GgufFullSize  # noqa: E402
from quantlab.store import read_model  # noqa: E402

TYPES = {"Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15}  # llama_ftype of each, for general.file_type
PUBLISHED_GB = {"Q8_0": 28.60, "Q6_K": 22.52, "Q4_K_M": 16.82}  # files people download (shared/reference)
CONTEXTS = (4096, 32768, 131072, 262144)
KV_TYPES = ("f16", "q8_0")
SLOTS = (1, 4)
BUDGET = 24 * 2**30
LABEL = ("llama.cpp's allocation plan (llama-fit-params, no_alloc: nothing allocated) for synthetic weights of "
         "the real shapes, CPU backend, no GPU")
MARKDOWN_NAME = "gguf-full-size.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "build" / "gguf-full-size"), help="folder for the sparse files")
    parser.add_argument("--out", default=str(ROOT / "measurements"), help="where the JSON and Markdown go")
    parser.add_argument("--config", default=str(ROOT / "quantlab" / "data" / "qwen3.6-27b"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the JSON already there")
    args = parser.parse_args()
    if args.render_only:
        data = read_model(Path(args.out) / GGUF_FULL_SIZE_NAME, GgufFullSize)
        (Path(args.out) / MARKDOWN_NAME).write_text(markdown(data), encoding="utf-8")
        return
    tools = llamacpp.locate()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    vocabulary = ROOT / "quantlab" / "bundled" / "model"  # a stand-in vocabulary: sizes don't change
    bf16 = {mtp: sparse_bf16(tools, Path(args.config), vocabulary, work, mtp) for mtp in (True, False)}
    sizes, quantized = measure_sizes(tools, bf16, work)
    allocations = plan_allocations(tools, quantized)
    embd = tensor_bytes(quantized[("Q4_K_M", True)], "token_embd.weight")
    fits = largest_fitting(tools, quantized[("Q4_K_M", True)], embd)
    result = GgufFullSize(
        label=LABEL,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        llama_cpp=tools.version,
        quantlab_commit=fingerprint.git_state(ROOT)[0],
        model="Qwen/Qwen3.6-27B (text model; shapes from quantlab/data/qwen3.6-27b/config.json)",
        weights="synthetic (sparse: no data), real shapes",
        seconds=round(time.perf_counter() - start, 1),
        sizes=sizes, published_gb=PUBLISHED_GB, allocations=allocations, fits_24gib=fits,
        token_embd_bytes_q4_k_m=embd,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / GGUF_FULL_SIZE_NAME).write_text(result.json_text(), encoding="utf-8")
    (out / MARKDOWN_NAME).write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out / GGUF_FULL_SIZE_NAME} and .md in {result.seconds:.0f} s")
    shutil.rmtree(work / "hf", ignore_errors=True)


def measure_sizes(tools, bf16: dict[bool, Path], work: Path) -> tuple[list, dict[tuple[str, bool], Path]]:
    """Every type with and without the MTP head: its sizes, and the sparse GGUF written for it."""
    sizes, quantized = [], {}
    for kind, ftype in TYPES.items():
        for mtp in (True, False):
            out = work / f"{kind.lower()}-{'mtp' if mtp else 'nomtp'}.gguf"
            size = quantized_size(tools, bf16[mtp], out, kind, ftype, mtp)
            sizes.append(size)
            print(f"{kind:7} {'with' if mtp else 'without'} MTP: tensors {size.tensor_bytes:,} B "
                  f"(dry run {size.dry_run_bytes:,} B)")
            quantized[(kind, mtp)] = out
    return sizes, quantized


def plan_allocations(tools, quantized: dict[tuple[str, bool], Path]) -> list:
    """llama.cpp's planned buffers for every type (with the MTP head), context, KV type and slot count."""
    allocations = []
    for kind in TYPES:
        for context in CONTEXTS:
            for kv in KV_TYPES:
                for slots in SLOTS:
                    a = planned_allocation(tools, quantized[(kind, True)], kind, context, kv, slots)
                    allocations.append(a)
                    plan = {k: getattr(a, k) for k in FIT_PRINT_BUFFERS}
                    print(f"{kind:7} {context:>7,} tokens KV {kv:5} × {slots} slot(s): "
                          f"{a.total / 2**30:6.2f} GiB ({plan})")
    return allocations


def largest_fitting(tools, model: Path, embd: int) -> dict:
    """The largest context (multiple of 1024) whose planned buffers fit 24 GiB, f16 and q8_0 KV, one slot:
    all buffers (CPU backend), and without token_embd (which llama.cpp keeps in host memory on a GPU)."""
    return {f"{kv}_{what}": largest_fitting_context(tools, model, kv, BUDGET, minus)
            for kv in KV_TYPES for what, minus in (("all_buffers", 0), ("without_token_embd", embd))}


SCHEMES = {"Q8_0": "gguf-q8_0", "Q6_K": "gguf-q6_k", "Q4_K_M": "gguf-q4_k_m"}


def estimate_vs_plan(r: GgufFullSize) -> list[dict]:
    """quantlab's estimator (llama.cpp profile, config alone) beside llama.cpp's plan, one slot: every buffer on the
    CPU backend, so the estimate counts token_embd too (on a GPU it stays in host memory)."""
    from quantlab.estimate.estimator import weights_for
    from quantlab.estimate.model import read_estimation_model
    from quantlab.estimate.runtime import memory_at, runtime_profile
    from quantlab.estimate.schemes import get_scheme

    model = read_estimation_model("qwen3.6-27b")
    rows = []
    for a in r.allocations:
        if a.slots != 1:
            continue  # -np N shares one -c and one micro-batch among N slots: not the estimator's batch
        weights = weights_for(model, get_scheme(SCHEMES[a.type]))
        rt = runtime_profile("llama.cpp", kv_dtype="fp16" if a.kv_type == "f16" else "q8_0")
        p = memory_at(weights, weights.bytes(False, False), model.shape, a.context, 1, rt)
        estimate = p.allocated + p.host_weights
        rows.append({"type": a.type, "context": a.context, "kv_type": a.kv_type, "estimate": estimate,
                     "llama_cpp": a.total, "ratio": estimate / a.total})
    return rows


def markdown(r: GgufFullSize) -> str:
    lines = [
        "# Qwen3.6-27B GGUF at full size: llama.cpp's own numbers",
        "",
        f"*{r.label}. {r.llama_cpp}; {r.created_at}. Estimates of nothing: the file sizes are llama-quantize's "
        "own (dry run, and a header written with the types it chose); the memory is llama.cpp's allocation plan.*",
        "",
    ]
    lines += _size_lines(r) + _plan_lines(r) + _estimate_lines(r) + _fits_lines(r)
    return "\n".join(lines)


def _size_lines(r: GgufFullSize) -> list[str]:
    gb = 1e9
    lines = ["## File sizes", "",
             "| Type | MTP head | Tensor data | Tensor data (GiB) | Published file | llama.cpp's dry run agrees |",
             "|---|---|---:|---:|---:|---|"]
    for s in r.sizes:
        lines.append(f"| {s.type} | {'kept (blk.64)' if s.mtp else 'left out'} | {s.tensor_bytes:,} B = "
                     f"{s.tensor_bytes / gb:.2f} GB | {s.tensor_bytes / 2**30:.3f} | "
                     f"{r.published_gb[s.type]:.2f} GB | "
                     f"{'yes' if abs(s.tensor_bytes - s.dry_run_bytes) < 2**20 / 100 else 'NO'} |")
    lines += ["", "The file adds its header (metadata and vocabulary: a few MB with the real 248,320-token vocabulary; "
              "the stand-in vocabulary here is smaller, so header bytes are not compared). Against the published "
              "files:", ""]
    for kind, published in r.published_gb.items():
        near = sorted((abs(published * 1e9 - s.tensor_bytes), s.mtp, s.tensor_bytes) for s in r.sizes if s.type == kind)
        gap, mtp, size = near[0]
        lines.append(f"- {kind}: published {published:.2f} GB; nearest is the file {'with' if mtp else 'without'} the "
                     f"MTP head ({size / 1e9:.3f} GB of tensors, {gap / 1e6:+,.0f} MB apart)"
                     + (": the published file is that one; the rest is its header (about 10 MB with the real vocabulary "
                        "and merges) and the rounding of the published figure." if gap < 30e6 else
                        ": neither variant explains it; a file whose MTP block kept another type (Q8_0 gives "
                        "22,522,855,424 B, per shared/reference/runtimes.md) or an older converter would."))
    return lines


def _plan_lines(r: GgufFullSize) -> list[str]:
    lines = ["",
             "## Memory llama.cpp plans for Q4_K_M, Q6_K and Q8_0", "",
             "Buffers per `llama-fit-params --fit-print` (MiB, rounded down by llama.cpp): model (weights; the MTP "
             "head is not loaded unless asked for), context (KV cache of the 16 full-attention layers + DeltaNet "
             "recurrent state per slot), compute (CPU backend, n_ubatch 512). `-c` is the context of all slots "
             "together.", "",
             "| Type | Context | KV | Slots | Model | Context | Compute | Total |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for a in r.allocations:
        cells = [getattr(a, k) / 2**30 for k in ("model_bytes", "context_bytes", "compute_bytes", "total")]
        lines.append(f"| {a.type} | {a.context:,} | {a.kv_type} | {a.slots} | "
                     + " | ".join(f"{c:.2f} GiB" for c in cells) + " |")
    return lines


def _estimate_lines(r: GgufFullSize) -> list[str]:
    rows = estimate_vs_plan(r)
    worst = max(rows, key=lambda row: abs(row["ratio"] - 1))
    lines = ["", "## quantlab's estimate beside llama.cpp's plan", "",
             "`quantlab estimate`'s llama.cpp profile, from the config alone, against the plan above (one slot, every "
             f"buffer). Largest difference: {100 * (worst['ratio'] - 1):+.1f}% ({worst['type']}, "
             f"{worst['context']:,} tokens, {worst['kv_type']} KV); the goal is within 2%.", "",
             "| Type | Context | KV | Estimate | llama.cpp | Estimate / llama.cpp |", "|---|---:|---|---:|---:|---:|"]
    return lines + [f"| {row['type']} | {row['context']:,} | {row['kv_type']} | {row['estimate'] / 2**30:.2f} GiB | "
                    f"{row['llama_cpp'] / 2**30:.2f} GiB | {row['ratio']:.3f} |" for row in rows]


def _fits_lines(r: GgufFullSize) -> list[str]:
    f = {k: (f"{v:,}" if v < 262144 else "the whole 262,144-token window") for k, v in r.fits_24gib.items()}
    return ["", "## \"A 24 GB GPU runs Q4 with room for context\"", "",
            f"Largest context whose planned buffers fit in 24 GiB, Q4_K_M, one slot: **{f['f16_without_token_embd']} "
            f"tokens** with an f16 KV cache ({f['q8_0_without_token_embd']} with q8_0), counting every buffer but "
            f"`token_embd` ({r.token_embd_bytes_q4_k_m / 2**30:.2f} GiB, which llama.cpp keeps in host memory "
            f"when the layers are on a GPU); {f['f16_all_buffers']} tokens counting it. Not included, because a CPU "
            "plan has none: the CUDA context (about 0.3-0.5 GiB), cuBLAS workspace, and the CUDA compute buffer in "
            "place of the CPU one. They need a GPU to measure; none was lent when this was made.", ""]


if __name__ == "__main__":
    main()
