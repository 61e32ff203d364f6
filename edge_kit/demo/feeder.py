"""One thread per simulated device: post held-out digits to the agent's `POST /predict`, then the true labels
to `POST /labels` (ground truth coming back later, as from a human check), at a steady rate.

The held-out digits come in two disjoint pools. A feeder draws from the first until its agent answers with
a model version other than the one it started with, then from the second: the agents capture what they
are fed and the retrained version trains on those captures, so the accuracy of the new version is measured
on images no model has trained on, never on transformed copies of its own training rows.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edge_kit.demo.processes import http_json
from edge_kit.demo.shifts import Shift, sample_batch

log = logging.getLogger(__name__)


@dataclass
class FeedStats:
    requests: int = 0
    samples: int = 0
    shifted_samples: int = 0
    errors: int = 0
    first_shifted_at: float | None = None  # unix time of the first inference on shifted input
    last_error: str | None = None
    models: set[str] = field(default_factory=set)  # model versions that answered
    # Per model version: labelled samples and correct predictions, at full shift severity only (all samples
    # on a clean device), so before and after compare the same kind of input.
    labelled: dict[str, int] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)

    def accuracy(self, version: str) -> float | None:
        n = self.labelled.get(version, 0)
        return round(self.correct.get(version, 0) / n, 4) if n else None


class DeviceFeeder(threading.Thread):
    def __init__(self, device: str, agent_url: str, x: np.ndarray, y: np.ndarray, labels: list[str],
                 shift: Shift, *, batch: int, interval_s: float, seed: int, send_labels: bool = True,
                 later: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__(name=f"feed-{device}", daemon=True)
        self.device = device
        self.agent_url = agent_url
        self.x, self.y, self.labels = x, y, labels
        self.later = later  # the second pool, fed once a new model version answers
        self.first_version: str | None = None
        self.shift = shift
        self.batch = batch
        self.interval_s = interval_s
        self.rng = np.random.default_rng(seed)
        self.send_labels = send_labels
        self.stats = FeedStats()
        self.started_at = time.time()
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        self.started_at = time.time()
        next_at = time.monotonic()
        while not self._halt.is_set():
            self.feed_once(time.time() - self.started_at)
            next_at += self.interval_s
            self._halt.wait(max(0.0, next_at - time.monotonic()))

    def feed_once(self, elapsed_s: float) -> None:
        severity = self.shift.severity(elapsed_s)
        inputs, truth = sample_batch(self.x, self.y, self.batch, self.shift, severity, self.rng)
        try:
            # Our own request id: the labels name it, so the agent matches them to this request's predictions
            # and to the rows it captured from it.
            request_id = f"{self.device}-{self.stats.requests + self.stats.errors}"
            answer = http_json(f"{self.agent_url}/predict", {"inputs": inputs.tolist(), "request_id": request_id})
            if self.send_labels:
                http_json(f"{self.agent_url}/labels",
                          {"labels": [self.labels[int(c)] for c in truth], "request_id": request_id})
        except Exception as exc:  # the agent may be swapping models or stopping: count it and go on
            self.stats.errors += 1
            if self.stats.last_error is None:
                log.warning("%s: request failed: %s", self.device, exc)
            self.stats.last_error = str(exc)
            return
        self.stats.requests += 1
        self.stats.samples += len(inputs)
        model = answer.get("model") or {}
        version = str(model.get("version"))
        self.stats.models.add(version)
        if self.first_version is None:
            self.first_version = version
        elif version != self.first_version and self.later is not None:
            self.x, self.y = self.later
            self.later = None
        if self.shift.kind == "none" or severity >= 1.0:
            predicted = answer.get("predictions") or []
            hits = sum(1 for p, t in zip(predicted, truth, strict=False) if p == self.labels[int(t)])
            self.stats.labelled[version] = self.stats.labelled.get(version, 0) + len(truth)
            self.stats.correct[version] = self.stats.correct.get(version, 0) + hits
        if severity > 0:
            self.stats.shifted_samples += len(inputs)
            if self.stats.first_shifted_at is None:
                self.stats.first_shifted_at = time.time()
