"""measurements/memory.png: claimed vs estimated vs measured weight memory, and memory vs context.

Left: per precision in the article's table, the claimed range, quantlab's estimate, the published
GGUF file size and quantlab's measurement when there is one. Right: the estimated total memory
of each method over the context lengths, with the usual GPU sizes as horizontal lines.
"""

from __future__ import annotations

import io
from pathlib import Path

from quantlab.claims import claims_data
from quantlab.estimate import PLOT_NAME
from quantlab.schema.estimate import EstimateResult
from quantlab.store import replace_file

GIB = 1 << 30
GPU_LINES_GIB = (24, 32, 48, 80)


def render_png(result: EstimateResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5), dpi=110, layout="constrained")
    left, right = figure.subplots(1, 2)
    _weights_panel(left, result)
    _context_panel(right, result)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_png(result: EstimateResult, output_dir: str | Path) -> Path:
    target = Path(output_dir) / PLOT_NAME
    replace_file(target, render_png(result))
    return target


def _weights_panel(ax, result: EstimateResult) -> None:
    rows = [c for c in result.claims if c["id"].startswith("weights_")]
    published = claims_data()["published"]["gguf_file_gb"]
    names = [c["claim"].split(" ")[0] for c in rows]
    x = range(len(rows))
    width = 0.2
    ax.bar([i - 1.5 * width for i in x], [c["claimed_high_gb"] for c in rows], width, label="claimed (range top)",
           color="#bbbbbb")
    ax.bar([i - 1.5 * width for i in x], [c["claimed_low_gb"] for c in rows], width, color="#888888",
           label="claimed (range bottom)")
    ax.bar([i - 0.5 * width for i in x], [c["estimate_gb"] for c in rows], width, label="quantlab estimate", color="#1f77b4")
    ax.bar([i + 0.5 * width for i in x], [published.get(n, 0) for n in names], width, label="published GGUF file",
           color="#2ca02c")
    ax.bar([i + 1.5 * width for i in x], [c["measured_gb"] or 0 for c in rows], width, label="quantlab measured (GPU)",
           color="#d62728")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("GB (10⁹ bytes)")
    ax.set_title(f"{result.model.name} weights: claimed vs estimated vs measured")
    ax.legend(fontsize=8)


def _context_panel(ax, result: EstimateResult) -> None:
    for method in result.methods:
        ax.plot([p.context for p in method.points], [p.total / 1e9 for p in method.points], marker="o", label=method.label)
    for gib in GPU_LINES_GIB:
        ax.axhline(gib * GIB / 1e9, color="#999999", linestyle=":", linewidth=1)
        ax.annotate(f"{gib} GB GPU", (0.01, gib * GIB / 1e9), xycoords=("axes fraction", "data"), fontsize=7,
                    va="bottom", color="#666666")
    contexts = [p.context for p in result.methods[0].points] if result.methods else []
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c / 1024:g}k" if c >= 1024 else str(c) for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("estimated total GB")
    a = result.assumptions
    ax.set_title(f"Estimated total memory ({a.profile} profile, {a.kv_dtype} KV, batch {a.batch})")
    ax.legend(fontsize=7, ncol=2)
