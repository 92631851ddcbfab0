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
    return _section(result, (Path(output_dir) / PLOT_NAME).is_file())


def _section(result: EstimateResult, has_plot: bool) -> list[str]:
    lines = [
        f"## The article's claims vs quantlab's estimate and measurements: {result.model.name}",
        "",
        f"From [`{ESTIMATES_NAME}`]({ESTIMATES_NAME}), written by `quantlab estimate` at {result.created_at} "
        "(a memory model computed from the config alone; see `quantlab/estimate/`).",
        "",
    ]
    if result.claims:
        lines += [*markdown(claims_table(result)), "", *claim_notes(result), ""]
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
