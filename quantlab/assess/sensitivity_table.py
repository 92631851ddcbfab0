"""What `quantlab sensitivity` prints: the table of class effects (KL with each class alone quantized, KL added,
KL added per GB saved, beside the baseline where the sweep has one), and the check of the suggested mixed build
beside the uniform ones on the same windows, with the paired difference and whether it is beyond the noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantlab.assess.sensitivity_select import ClassEffect


def gb(size: float) -> str:
    return f"{size / 1e9:.4g} GB"


def table(effects: list[ClassEffect], baseline=None) -> list[str]:
    lines = [f"{'class':<22} {'parameters':>14} {'MB saved':>10} {'KL':>9} {'95% interval':>20} {'KL added':>10} "
             f"{'KL per GB saved':>16}"]
    for e in effects:
        ci = f"[{e.kl_ci[0]:.5f}, {e.kl_ci[1]:.5f}]" if e.kl_ci else "—"
        lines.append(f"{e.name:<22} {e.parameters:>14,} {e.bytes_saved / 1e6:>10.3f} {e.kl:>9.5f} {ci:>20} "
                     f"{e.kl_added:>10.5f} {e.kl_per_gb:>16.3f}")
    if baseline is not None:
        ci = f"[{baseline.kl_mean_ci[0]:.5f}, {baseline.kl_mean_ci[1]:.5f}]" if baseline.kl_mean_ci else "—"
        lines.append(f"{'baseline':<22} {'':>14} {'':>10} {baseline.kl_mean:>9.5f} {ci:>20}   "
                     f"({baseline.candidate}); KL added = KL − the baseline's")
    return lines


def check_lines(checked: list[tuple[str, float, Any]]) -> list[str]:
    from quantlab.quality.noise import outside_noise, paired_difference

    lines = ["", "check: the suggested build beside the uniform ones, on the same windows",
             f"{'build':<24} {'weights GB':>12} {'KL mean':>10} {'95% interval':>22}"]
    for label, size, q in checked:
        ci = f"[{q.kl_mean_ci[0]:.5f}, {q.kl_mean_ci[1]:.5f}]" if q.kl_mean_ci else "—"
        lines.append(f"{label:<24} {size / 1e9:>12.6f} {q.kl_mean:>10.5f} {ci:>22}")
    mixed = next(q for label, _, q in checked if label == "suggested mixed")
    label, _, last = checked[-1]
    if last is not mixed:
        difference = paired_difference(last.window_sums, mixed.window_sums)
        verdict = {True: "beyond the noise", False: "within the noise", None: "not comparable"}[outside_noise(difference)]
        span = f"[{difference[0]:+.5f}, {difference[1]:+.5f}]" if difference else "—"
        lines.append(f"suggested mixed − {label}: KL {span}, {verdict}")
        if difference and difference[0] > 0:
            lines.append(f"the uniform build ({label}) is closer to the reference at about the same size: prefer it")
    return lines
