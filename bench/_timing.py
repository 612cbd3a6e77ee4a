"""Timing helper shared by the benchmarks (a leading underscore keeps `python -m bench` from running it)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> np.ndarray:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones: (repeats,) float64."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times)
