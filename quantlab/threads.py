"""CPU threads that fit the cores other processes leave free.

torch's CPU kernels run OpenMP teams of one thread per core, whose threads spin at every barrier while they
wait for the slowest. With one core busy elsewhere, a thread of the team is descheduled and the rest spin:
on a 2-core machine, decoding the bundled model beside one busy process ran 4x slower, not the 2x that
losing a core explains (scripts/bench_contention.py). Running as many threads as there are idle cores
brings it back in proportion. OMP_WAIT_POLICY=PASSIVE does too, but slows the uncontended case (1.8x on
the same decode), so it is not used.

QUANTLAB_THREADS=N (or OMP_NUM_THREADS) fixes the count instead; either way the records say how many ran.
"""

from __future__ import annotations

import os

import psutil
import torch

SAMPLE_S = 0.25


def fit_threads() -> str | None:
    """Set torch's CPU threads to the cores that are idle now; a note for the records when that is fewer than
    torch's default or when the user fixed the count, else None."""
    fixed = os.environ.get("QUANTLAB_THREADS")
    if fixed:
        threads = _positive_int(fixed)
        torch.set_num_threads(threads)
        return f"CPU threads: {threads} (QUANTLAB_THREADS)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(sum(psutil.cpu_percent(interval=SAMPLE_S, percpu=True)) / 100)
    threads = max(1, cores - busy)
    torch.set_num_threads(threads)  # also back up to all cores, when an earlier call in this process lowered it
    if threads == cores:
        return None
    return (f"CPU threads: {threads} of {cores} cores: other processes kept {busy} core(s) busy when the run started "
            "(more threads than idle cores slow torch's CPU kernels far beyond the cores lost)")


def _positive_int(text: str) -> int:
    from quantlab.errors import QuantlabError

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise QuantlabError(f"QUANTLAB_THREADS={text!r}: must be a whole number of threads, at least 1")
    return value
