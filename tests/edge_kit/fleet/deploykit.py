"""Simulated devices for the deployment tests: windows and status documents as agents send them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from device_agent.monitoring.summary import WindowSummary
from device_agent.uplink.wire import status_topic, summary_topic
from harness.fleetkit import LABELS, DigitsBundle, sample_images


def window(bundle: DigitsBundle, device: str, start: float, rng: np.random.Generator, *, fleet: str, n: int = 300,
           skew: bool = False, seq: int = 0) -> tuple[str, bytes, str]:
    """(topic, payload, content type) of one window. `skew`: half the inputs are predicted as class 0 (what
    a bundle with broken in-graph preprocessing constants does: it collapses classes), the inputs are clean."""
    x, _ = sample_images(n, rng)
    values = bundle.values(x)
    if skew:
        c = bundle.reference.names.index("out.pred")
        half = rng.random(n) < 0.5
        values[half, c] = 0.0
    s = WindowSummary.zero(bundle.histogrammer, fleet=fleet, device=device, model=bundle.model, window_start=start,
                           seq=seq, label_names=LABELS)
    s.update(bundle.histogrammer, values)
    s.window_end = start + 60.0
    return (summary_topic(fleet, device), *s.to_bytes())


def status(bundle: DigitsBundle, device: str, *, fleet: str, deployment: dict[str, Any] | None = None,
           requests: int = 0, failed: int = 0, p95: float = 2.0) -> tuple[str, bytes, str]:
    doc: dict[str, Any] = {"state": "online", "model": bundle.model,
                           "serving": {"requests": requests, "failed_requests": failed,
                                       "latency_ms": {"p50": p95 / 2, "p95": p95}}}
    if deployment is not None:
        doc["deployment"] = deployment
    return status_topic(fleet, device), json.dumps(doc).encode(), "application/json"


def report(dep_id: str, bundle: DigitsBundle, step: str, at: float, reason: str | None = None,
           sha256: str = "0" * 64) -> dict[str, Any]:
    return {"deployment": dep_id, "version": bundle.model["version"], "sha256": sha256, "step": step,
            "reason": reason, "bytes": 0, "at": at}
