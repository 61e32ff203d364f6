"""How the model now serving is doing: requests, failed requests and latency since it started serving.

The fleet's canary compares these figures between devices on the new version and devices on the
old one, so they restart from zero whenever another model is swapped in (`reset`). Latency is kept
as the most recent `LATENCY_SAMPLES` request times (a bounded ring, O(1) per request); the
percentiles are computed only when the status is built.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

LATENCY_SAMPLES = 2048


class ServingStats:
    """Thread-safe. `lock` may be the caller's own (the agent's counter lock), so that a request is
    counted here and in the caller's counters under one acquisition (`record_ok_locked`)."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self._lock = lock if lock is not None else threading.Lock()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.requests = 0
        self.failed_requests = 0
        self.since: float | None = None

    def reset(self, since: float) -> None:
        with self._lock:
            self._latencies.clear()
            self.requests = self.failed_requests = 0
            self.since = since

    def record(self, seconds: float, *, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            if ok:
                self._latencies.append(seconds)
            else:
                self.failed_requests += 1

    def record_ok_locked(self, seconds: float) -> None:
        """`record(seconds, ok=True)` for a caller that already holds the lock it passed in."""
        self.requests += 1
        self._latencies.append(seconds)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            samples = np.fromiter(self._latencies, dtype=np.float64, count=len(self._latencies))
            requests, failed, since = self.requests, self.failed_requests, self.since
        latency: dict[str, Any] = {"p50": None, "p95": None, "samples": 0}
        if samples.size:
            p50, p95 = np.percentile(samples * 1000.0, [50, 95])
            latency = {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "samples": int(samples.size)}
        return {"requests": requests, "failed_requests": failed, "latency_ms": latency, "since": since}
