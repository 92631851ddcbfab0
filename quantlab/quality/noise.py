"""How sure a quality figure is: bootstrap intervals over windows, and whether two builds differ beyond the noise.

Tokens inside one window share their context, so they are not independent samples; windows (nearly) are. Each
resample draws as many windows as there are, with replacement, and recomputes the figure from per-window sums
(Σ KL, Σ NLL reference, Σ NLL candidate, tokens). Torch-free: the report uses it on stored results.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray) -> list[float]:
    tail = (1 - CONFIDENCE) / 2
    return [float(v) for v in np.quantile(values, [tail, 1 - tail])]


def intervals(sums, resamples: int = RESAMPLES, seed: int = SEED):
    """(KL mean interval, perplexity ratio interval), each [low, high]; (None, None) with fewer than 2 windows."""
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2 or sums.shape[0] < 2:
        return None, None
    drawn = sums[_draws(sums.shape[0], resamples, seed)].sum(axis=1)
    kl_mean = drawn[:, 0] / drawn[:, 3]
    ratio = np.exp((drawn[:, 2] - drawn[:, 1]) / drawn[:, 3])
    return _interval(kl_mean), _interval(ratio)


def paired_difference(a_sums, b_sums, resamples: int = RESAMPLES, seed: int = SEED) -> list[float] | None:
    """Interval of KL mean(b) − KL mean(a) for two candidates scored on the same windows, the same windows drawn
    for both (a paired bootstrap); None when they were not scored on the same windows."""
    a, b = np.asarray(a_sums, dtype=np.float64), np.asarray(b_sums, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2 or not np.array_equal(a[:, 3], b[:, 3]):
        return None
    picks = _draws(a.shape[0], resamples, seed)
    da, db = a[picks].sum(axis=1), b[picks].sum(axis=1)
    return _interval(db[:, 0] / db[:, 3] - da[:, 0] / da[:, 3])


def outside_noise(difference: list[float] | None) -> bool | None:
    """Whether a difference's interval excludes zero; None when it could not be computed."""
    if difference is None:
        return None
    return difference[0] > 0 or difference[1] < 0
