"""The report's estimator section, from measurements/estimates.json when `quantlab estimate` wrote one."""

from __future__ import annotations

from pathlib import Path

from quantlab.estimate import ESTIMATES_NAME, PLOT_NAME
from quantlab.outputs import md_text
from quantlab.schema.bench import FITS_PAIR, GGUF_FULL_SIZE_NAME, GgufFullSize
from quantlab.schema.estimate import EstimateResult
from quantlab.store import UNREADABLE, read_model, why
from quantlab.estimate.render import (
    checks_table, claim_notes, claims_table, header_lines, markdown, memory_table, multi_gpu_lines, multi_gpu_table,
)



def estimate_section(output_dir: str | Path) -> list[str]:
    """Markdown lines for the report; [] when there is no estimates.json."""
    path = Path(output_dir) / ESTIMATES_NAME
    if not path.exists() and not path.is_symlink():
        return []  # a folder or a broken link named estimates.json is said below, not dropped in silence
    try:
        result = read_model(path, EstimateResult)
    except UNREADABLE as exc:
        return ["## Estimates", "", f"- {md_text(path)}: skipped, not a valid estimate ({md_text(why(exc))}); this "
                "section is left out; rerun `quantlab estimate`", ""]
    return _section(_escaped(result), (Path(output_dir) / PLOT_NAME).is_file(), llama_plan_cells(output_dir))


def _escaped(result: EstimateResult) -> EstimateResult:
    """The estimate with every text it holds escaped for Markdown (it is a data file, so text from anywhere), but
    claim ids, which are looked up, not shown. Escaping is one-to-one: labels still match their keys."""
    def escape(value, key=None):
        if isinstance(value, str):
            return value if key == "id" else md_text(value)
        if isinstance(value, dict):
            return {k: escape(v, k) for k, v in value.items()}
        return [escape(v, key) for v in value] if isinstance(value, list) else value
    return EstimateResult.model_validate(escape(result.model_dump()))


def llama_plan_cells(output_dir: str | Path) -> dict[str, str]:
    """Claim id → llama.cpp's own numbers from gguf-full-size.json (scripts/gguf_full_size.py writes it through
    GgufFullSize), when it is there."""
    try:  # the report's own gguf-full-size section says what is wrong with the file
        data = read_model(Path(output_dir) / GGUF_FULL_SIZE_NAME, GgufFullSize)
    except UNREADABLE:
        return {}
    fits = data.fits_24gib
    cells = {}
    for kind in ("Q8_0", "Q6_K", "Q4_K_M"):
        size = {s.mtp: s.tensor_bytes for s in data.sizes if s.type == kind}
        plan = {a.context: a.total for a in data.allocations if a.type == kind and a.kv_type == "f16" and a.slots == 1}
        if not size or 4096 not in plan:
            continue
        cells[f"weights_{kind.lower()}"] = (f"file tensors {size[False] / 1e9:.2f} GB without MTP, "
                                            f"{size[True] / 1e9:.2f} GB with (llama-quantize --dry-run)")
        cells[f"fits_{kind.lower()}"] = (f"all buffers {plan[4096] / 1e9:.1f} GB at 4,096 tokens, "
                                         f"{plan.get(32768, 0) / 1e9:.1f} GB at 32,768 (f16 KV, 1 slot)")
    if FITS_PAIR[0] in fits:
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
