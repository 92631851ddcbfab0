"""Scoring a sensitivity sweep's candidates: whatever the backend (sensitivity_rtn.RtnSweep,
sensitivity_gguf.GgufSweep), the sweep builds each candidate and releases it, and here they are scored against
the session's reference windows, as many at once as memory allows, into one ClassEffect per class and, once
classes are chosen, the check builds' results.
"""

from __future__ import annotations

from typing import Any, Callable

from quantlab.assess.sensitivity_select import ClassEffect


def evaluate_built(session, builders: dict[str, Callable[[], Any]], release: Callable[[Any], None],
                   candidate_bytes: float | None = None) -> dict:
    """Score built candidates against the same reference windows. Stored mode reuses the stored reference: one
    candidate at a time, each released before the next is built. Paired mode holds the reference beside the
    candidates (small models): as many per reference pass as fit in half the device's free memory."""
    labels = list(builders)
    at_once = candidates_at_once(session, candidate_bytes) if session.q.spec.mode == "paired" else 1
    groups = [labels[i:i + at_once] for i in range(0, len(labels), at_once)]
    results = {}
    for group in groups:
        built = {}
        try:
            for label in group:
                built[label] = builders[label]()
            results.update(session.evaluate_many(built))
        finally:
            for model in built.values():
                release(model)
    return results


def candidates_at_once(session, candidate_bytes: float | None) -> int:
    """How many candidates of `candidate_bytes` fit in half the free memory of the session's device now."""
    import torch

    from quantlab.fingerprint import available_host_ram

    if not candidate_bytes:
        return 1 << 30
    device = getattr(session, "device", torch.device("cpu"))
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_ram()
    return max(1, int(free * 0.5 // candidate_bytes))


def sweep_effects(session, sweep) -> tuple[list[ClassEffect], Any]:
    """One candidate per class at the recipe's quantization and one per class and higher level (and the baseline
    where the sweep has one), all on the same windows; most KL per byte saved first."""
    kinds, levels = list(sweep.parameters()), sweep.levels()
    builders = {kind: (lambda kind=kind: sweep.build_class(kind)) for kind in kinds}
    builders |= {f"{kind} at {level}": (lambda kind=kind, level=level: sweep.build_class(kind, level))
                 for kind in kinds for level in levels}
    if sweep.baseline_label:
        builders = {sweep.baseline_label: sweep.build_baseline, **builders}
    results = evaluate_built(session, builders, sweep.release, sweep.candidate_bytes())
    base = results.get(sweep.baseline_label) if sweep.baseline_label else None
    floor = base.kl_mean if base else 0.0
    effects = [ClassEffect(kind, n, results[kind].kl_mean,
                           tuple(results[kind].kl_mean_ci) if results[kind].kl_mean_ci else None,
                           sweep.bytes_saved(kind), floor,
                           {level: results[f"{kind} at {level}"].kl_mean - floor for level in levels})
               for kind, n in sweep.parameters().items()]
    return sorted(effects, key=lambda e: -e.kl_per_gb), base


def evaluate_checks(session, sweep, chosen: dict[str, str]) -> list[tuple[str, float, Any]]:
    """The uniform build, the suggested mixed one and the budget's uniform build, scored on the same windows."""
    builds = sweep.check_builds(chosen)
    results = evaluate_built(session, {label: builder for label, _, builder in builds}, sweep.release,
                             sweep.candidate_bytes())
    return [(label, size, results[label]) for label, size, _ in builds]
