"""Timing shared by the benchmarks (run as scripts: bench/ is on sys.path)."""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each fn, timed round-robin so drifting machine load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
