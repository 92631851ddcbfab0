"""The report's estimator section, from measurements/estimates.json when `quantlab estimate` wrote one."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from quantlab.estimate import ESTIMATES_NAME, PLOT_NAME
from quantlab.schema.estimate import EstimateResult
from quantlab.estimate.render import (
    checks_table, claim_notes, claims_table, header_lines, markdown, memory_table, multi_gpu_lines, multi_gpu_table,
)



def estimate_section(output_dir: str | Path) -> list[str]:
    """Markdown lines for the report; [] when there is no estimates.json."""
    path = Path(output_dir) / ESTIMATES_NAME
    if not path.is_file():
        return []
    try:
        result = EstimateResult.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, RecursionError, json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        return ["## Estimates", "", f"- {path}: skipped, not a valid estimate ({type(exc).__name__}); rerun `quantlab estimate`", ""]
    return _section(result, (Path(output_dir) / PLOT_NAME).is_file(), llama_plan_cells(output_dir))


def llama_plan_cells(output_dir: str | Path) -> dict[str, str]:
    """Claim id → llama.cpp's own numbers from gguf-full-size.json (scripts/gguf_full_size.py), when it is there."""
    path = Path(output_dir) / "gguf-full-size.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sizes, plans, fits = data["sizes"], data["allocations"], data["fits_24gib"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    cells = {}
    for kind in ("Q8_0", "Q6_K", "Q4_K_M"):
        size = {s["mtp"]: s["tensor_bytes"] for s in sizes if s["type"] == kind}
        plan = {a["context"]: a["total"] for a in plans if a["type"] == kind and a["kv_type"] == "f16" and a["slots"] == 1}
        if not size or 4096 not in plan:
            continue
        cells[f"weights_{kind.lower()}"] = (f"file tensors {size[False] / 1e9:.2f} GB without MTP, "
                                            f"{size[True] / 1e9:.2f} GB with (llama-quantize --dry-run)")
        cells[f"fits_{kind.lower()}"] = (f"all buffers {plan[4096] / 1e9:.1f} GB at 4,096 tokens, "
                                         f"{plan.get(32768, 0) / 1e9:.1f} GB at 32,768 (f16 KV, 1 slot)")
    if "f16_without_token_embd" in fits:
        cells["room_for_context"] = (f"24 GiB holds {fits['f16_without_token_embd']:,} tokens (f16 KV) / "
                                     f"{fits['q8_0_without_token_embd']:,} (q8_0) without token_embd, kept in host "
                                     "memory; CUDA context and workspace not included")
    return cells


def _section(result: EstimateResult, has_plot: bool, llama_plan: dict[str, str] | None = None) -> list[str]:
    lines = [
        f"## The article's claims vs quantlab's estimate and measurements: {result.model.name}",
        "",
        f"From [`{ESTIMATES_NAME}`]({ESTIMATES_NAME}), written by `quantlab estimate` at {result.created_at} "
        "(a memory model computed from the config alone; see `quantlab/estimate/`).",
        "",
    ]
    if result.claims:
        lines += [*markdown(claims_table(result, llama_plan)), "", *claim_notes(result), ""]
    if has_plot:
        lines += [f"![claimed vs estimated vs measured memory]({PLOT_NAME})", ""]
    lines += [*[f"{line}  " for line in header_lines(result)], ""]
    lines += [*markdown(memory_table(result)), ""]
    if result.multi_gpu:
        lines += ["Across GPUs (estimate):", "", *multi_gpu_lines(result), "", *markdown(multi_gpu_table(result)), ""]
    if result.checks:
        lines += ["Estimate vs measured (GPU records; the goal is a prefill peak within 5%):", ""]
        lines += [*markdown(checks_table(result)), ""]
    else:
        lines += ["No GPU records yet, so no estimate-vs-measured check: run a recipe on a GPU, then `quantlab estimate`.", ""]
    return lines
