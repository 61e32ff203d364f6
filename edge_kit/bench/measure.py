"""Timing statistics: percentiles and spread of repeated calls. Pure functions, no engine code."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def spread(samples: Sequence[float]) -> dict[str, float]:
    """min/median/max/mean of samples (as given, e.g. seconds), with their count."""
    if not samples:
        raise ValueError("no samples")
    return {
        "min": float(min(samples)),
        "median": float(statistics.median(samples)),
        "max": float(max(samples)),
        "mean": float(statistics.fmean(samples)),
        "n": len(samples),
    }


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and the spread of per-call latencies, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), **spread(ms.tolist())}


def time_calls(fn: Callable[[], Any], *, repeat: int, warmup: int) -> list[float]:
    """Seconds taken by each of `repeat` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def throughput_summary(batch: int, seconds: Sequence[float]) -> dict[str, Any]:
    """Items per second of a batch size from per-call times (median, and the range min..max)."""
    s = spread(seconds)
    return {
        "items_per_s": batch / s["median"],
        "items_per_s_min": batch / s["max"],
        "items_per_s_max": batch / s["min"],
        "seconds_per_batch": s,
    }


def tile_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """A contiguous batch of `batch` samples taken from `x` in order, repeating it when it is shorter."""
    idx = np.arange(batch) % len(x)
    return np.ascontiguousarray(x[idx])
