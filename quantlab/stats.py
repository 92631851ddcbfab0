"""Summaries of repeated measurements: median and spread, p90 once there are enough runs."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from quantlab.schema.measurement import Summary

MIN_RUNS_FOR_P90 = 10


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("cannot summarize an empty list of measurements")
    ordered = sorted(values)
    n = len(ordered)
    return Summary(
        n=n,
        median=statistics.median(ordered),
        min=ordered[0],
        max=ordered[-1],
        mean=statistics.fmean(ordered),
        stdev=statistics.stdev(ordered) if n > 1 else None,
        p90=_percentile(ordered, 0.9) if n >= MIN_RUNS_FOR_P90 else None,
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
