"""Every build of a model side by side: weight bytes against KL mean with its interval, the Pareto front, and
whether neighbouring builds differ beyond the noise. Torch-free: `quantlab report` draws it from the records.

Builds are compared only under one protocol (reference, text, scored tokens, context, stride): published KLs at
512 and 4096 tokens of context differ several-fold, so numbers from different protocols never share a table.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass

from quantlab.quality.noise import outside_noise, paired_difference
from quantlab.quality.show import protocol

PLOT_NAME = "quality.png"


@dataclass(frozen=True)
class Build:
    label: str  # method label, and the runtime when it is not transformers
    weight_bytes: int
    kl_mean: float
    kl_ci: tuple[float, float] | None
    ppl_ratio: float
    window_sums: list | None
    pareto: bool = False


@dataclass(frozen=True)
class Comparison:
    model: str
    protocol: str
    reference: str
    builds: tuple[Build, ...]  # by KL mean, lowest first


def comparisons(records) -> list[Comparison]:
    """One comparison per (model, reference, protocol) with two or more builds: each build's latest record."""
    groups: dict[tuple, dict[str, object]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r.created_at):
        q = r.quality
        if q is None or q.kl_mean is None:
            continue
        runtime = r.runtime.name if getattr(r, "runtime", None) else "transformers"
        label = r.method.label + ("" if runtime == "transformers" else f" ({runtime})")
        groups[(r.model.name, q.reference, protocol(q))][label] = Build(
            label, r.weight_bytes, q.kl_mean, tuple(q.kl_mean_ci) if q.kl_mean_ci else None, q.ppl_ratio,
            q.window_sums)
    found = []
    for (model, reference, proto), builds in sorted(groups.items()):
        if len(builds) >= 2:
            ordered = sorted(builds.values(), key=lambda b: (b.kl_mean, b.weight_bytes))
            found.append(Comparison(model, proto, reference, tuple(_mark_pareto(ordered))))
    return found


def _mark_pareto(builds: list[Build]) -> list[Build]:
    """On the front: no other build is at most as large and at most as far from the reference, and better in one."""
    def dominated(b: Build) -> bool:
        return any(o is not b and o.weight_bytes <= b.weight_bytes and o.kl_mean <= b.kl_mean
                   and (o.weight_bytes < b.weight_bytes or o.kl_mean < b.kl_mean) for o in builds)
    return [Build(**{**vars(b), "pareto": not dominated(b)}) for b in builds]


def section(records) -> list[str]:
    found = comparisons(records)
    if not found:
        return []
    lines = ["## Quality against size: every build", "",
             "KL mean (nats per token, against the reference) with its 95% interval (bootstrap over windows); "
             "Pareto front: no other build is both smaller and closer to the reference. \"Beyond the noise\": the "
             "interval of the KL difference to the next build up (paired bootstrap over the same windows) "
             "excludes zero.", ""]
    for c in found:
        lines += [f"**{c.model}** against {c.reference}; protocol: {c.protocol}.", "",
                  "| Build | Weights | KL mean | 95% interval | PPL ratio | Pareto front | vs the next build up |",
                  "|---|--:|--:|---|--:|---|---|"]
        for below, b in zip((None, *c.builds), c.builds):
            ci = f"[{b.kl_ci[0]:.5f}, {b.kl_ci[1]:.5f}]" if b.kl_ci else "—"
            lines.append(f"| {b.label} | {b.weight_bytes / 1e9:.4f} GB | {b.kl_mean:.5f} | {ci} | {b.ppl_ratio:.4f} | "
                         f"{'yes' if b.pareto else ''} | {_versus(below, b)} |")
        lines.append("")
    return lines + [f"![weight bytes against KL mean]({PLOT_NAME})", ""]


def _versus(below: Build | None, b: Build) -> str:
    if below is None:
        return "—"
    difference = paired_difference(below.window_sums, b.window_sums) if below.window_sums and b.window_sums else None
    beyond = outside_noise(difference)
    if beyond is None:
        return "not comparable (other windows)"
    return (f"{below.label}: +[{difference[0]:.5f}, {difference[1]:.5f}], "
            + ("beyond the noise" if beyond else "within the noise"))


def render_png(found: list[Comparison]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7 * len(found), 5), dpi=110, layout="constrained")
    axes = figure.subplots(1, len(found), squeeze=False)[0]
    for ax, c in zip(axes, found):
        for b in c.builds:
            low, high = b.kl_ci or (b.kl_mean, b.kl_mean)
            ax.errorbar(b.weight_bytes / 1e9, b.kl_mean, yerr=[[b.kl_mean - low], [high - b.kl_mean]], fmt="o",
                        color="tab:red" if b.pareto else "tab:blue", capsize=3)
            ax.annotate(b.label, (b.weight_bytes / 1e9, b.kl_mean), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        front = sorted((b for b in c.builds if b.pareto), key=lambda b: b.weight_bytes)
        ax.plot([b.weight_bytes / 1e9 for b in front], [b.kl_mean for b in front], color="tab:red", lw=1,
                label="Pareto front")
        ax.set_yscale("log")  # KL > 0: builds an order of magnitude apart stay readable
        ax.set_xlabel("weights (GB)")
        ax.set_ylabel("KL mean vs reference (nats/token), 95% interval")
        ax.set_title(f"{c.model}\n{c.protocol}", fontsize=9)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
