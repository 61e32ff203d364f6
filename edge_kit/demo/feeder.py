"""One thread per simulated device: post held-out digits to the agent's `POST /predict`, then the true labels
to `POST /labels` (ground truth coming back later, as from a human check), at a steady rate."""

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


class DeviceFeeder(threading.Thread):
    def __init__(self, device: str, agent_url: str, x: np.ndarray, y: np.ndarray, labels: list[str],
                 shift: Shift, *, batch: int, interval_s: float, seed: int, send_labels: bool = True) -> None:
        super().__init__(name=f"feed-{device}", daemon=True)
        self.device = device
        self.agent_url = agent_url
        self.x, self.y, self.labels = x, y, labels
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
            answer = http_json(f"{self.agent_url}/predict", {"inputs": inputs.tolist()})
            request_id = answer.get("request_id")
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
        self.stats.models.add(str(model.get("version")))
        if severity > 0:
            self.stats.shifted_samples += len(inputs)
            if self.stats.first_shifted_at is None:
                self.stats.first_shifted_at = time.time()
