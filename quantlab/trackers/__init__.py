"""Trackers: context managers that measure what runs inside them and leave a frozen result.

    with MemoryTracker(device) as mem, Timer(device) as t:
        model(...)
    mem.result.peak_allocated_bytes, t.result.seconds
"""

from quantlab.trackers.memory import MemoryTracker
from quantlab.trackers.timing import Timer

__all__ = ["MemoryTracker", "Timer"]
