"""The open window: what the agent saw and predicted since the last window closed.

Cheap on the hot path: a prediction only copies its raw inputs and logits into a preallocated
buffer (a few microseconds); channel values and histograms are computed for a whole chunk at once,
vectorised, when the buffer fills or the window closes. So the per-batch cost of monitoring is a
memcpy plus an amortised share of one numpy pass per chunk.

Ground-truth labels come back later, for the most recent predictions or for a request id; they add
to the confusion counts of the window that is open when they arrive.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from device_agent.bundle import REFERENCE
from device_agent.channels import MonitorPlan
from device_agent.errors import InputError, VerificationError
from device_agent.reference import Reference
from device_agent.summary import Histogrammer, WindowSummary

DEFAULT_CHUNK = 2048
# The buffer holds at most this many bytes of raw inputs: 2048 digits images are 0.5 MB, while a
# 224x224x3 camera model gets a chunk of a few images instead of gigabytes.
CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_LABEL_MEMORY = 4096
DEFAULT_REQUEST_MEMORY = 1024


def histogrammer_for(plan: MonitorPlan, reference_json: dict[str, Any]) -> Histogrammer:
    """Binning for a bundle's reference, with channels in the order `plan.values` produces them."""
    try:
        reference = Reference.from_json(reference_json)
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(REFERENCE, f"malformed reference histograms: {exc}") from exc
    # reference.json is written with sorted keys, so its order is not the plan's: match by name.
    missing = [n for n in plan.channel_names if n not in reference.channels]
    if missing:
        raise VerificationError(REFERENCE, f"no reference histogram for monitored channels {missing[:5]}")
    reference = Reference({name: reference.channels[name] for name in plan.channel_names})
    return Histogrammer(reference)


class WindowMonitor:
    """Buffers one model's predictions and turns them into one `WindowSummary` per window."""

    def __init__(
        self,
        plan: MonitorPlan,
        histogrammer: Histogrammer,
        *,
        fleet: str,
        device: str,
        model: dict[str, str],
        window_start: float,
        seq: int = 0,
        n_outputs: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        label_memory: int = DEFAULT_LABEL_MEMORY,
    ) -> None:
        self.plan = plan
        self.histogrammer = histogrammer
        self.fleet, self.device, self.model = fleet, device, dict(model)
        sample_bytes = 4 * int(np.prod(plan.input_shape))
        self._chunk = max(1, min(chunk, CHUNK_BYTES // max(1, sample_bytes)))
        self._inputs = np.empty((self._chunk, *plan.input_shape), dtype=np.float32)
        self._outputs = np.empty((self._chunk, n_outputs or len(plan.labels)), dtype=np.float32)
        self._predicted = np.empty(self._chunk, dtype=np.int64)
        self._fill = 0
        self._lock = threading.Lock()
        self._recent = np.zeros(label_memory, dtype=np.int64)  # ring of predicted classes
        self._recent_next = 0
        self._recent_count = 0
        self._requests: OrderedDict[str, np.ndarray] = OrderedDict()
        self.summary = self._zero(window_start, seq)

    def _zero(self, start: float, seq: int) -> WindowSummary:
        return WindowSummary.zero(
            self.histogrammer, fleet=self.fleet, device=self.device, model=self.model,
            window_start=start, seq=seq, label_names=list(self.plan.labels),
        )

    @property
    def n(self) -> int:
        """Inferences in the open window, buffered ones included."""
        return self.summary.n + self._fill

    def record(self, raw: np.ndarray, outputs: np.ndarray, predicted: np.ndarray, request_id: str | None) -> None:
        """Add one checked batch of raw inputs with its model outputs and predicted classes."""
        n = len(raw)
        with self._lock:
            if self._fill + n > self._chunk:
                self._flush()
            if n >= self._chunk:
                self.summary.update_by_channel(self.histogrammer, self.plan.values_by_channel(raw, outputs, predicted))
            else:
                self._inputs[self._fill : self._fill + n] = raw
                self._outputs[self._fill : self._fill + n] = outputs
                self._predicted[self._fill : self._fill + n] = predicted
                self._fill += n
            self._remember(predicted, request_id)

    def _flush(self) -> None:
        if self._fill:
            k = self._fill
            self.summary.update_by_channel(
                self.histogrammer,
                self.plan.values_by_channel(self._inputs[:k], self._outputs[:k], self._predicted[:k]),
            )
            self._fill = 0

    def _remember(self, predicted: np.ndarray, request_id: str | None) -> None:
        size = len(self._recent)
        p = predicted[-size:]
        start = self._recent_next
        if start + len(p) <= size:  # the usual case: one slice, no index arithmetic
            self._recent[start : start + len(p)] = p
        else:
            self._recent[(start + np.arange(len(p))) % size] = p
        self._recent_next = (start + len(p)) % size
        self._recent_count = min(size, self._recent_count + len(p))
        if request_id is not None:
            self._requests[request_id] = predicted.copy()
            self._requests.move_to_end(request_id)
            while len(self._requests) > DEFAULT_REQUEST_MEMORY:
                self._requests.popitem(last=False)

    def feed_labels(self, labels: Sequence[Any], request_id: str | None = None) -> int:
        """Ground truth for the most recent predictions (or one request's); returns how many were counted."""
        true = self._class_indices(labels)
        with self._lock:
            if request_id is not None:
                predicted = self._requests.get(request_id)
                if predicted is None:
                    raise InputError(f"unknown or expired request id {request_id!r}")
                if len(predicted) != len(true):
                    raise InputError(f"request {request_id!r} had {len(predicted)} samples, got {len(true)} labels")
            else:
                if len(true) > self._recent_count:
                    raise InputError(f"{len(true)} labels but only {self._recent_count} recent predictions remembered")
                size = len(self._recent)
                idx = (self._recent_next - len(true) + np.arange(len(true))) % size
                predicted = self._recent[idx]
            self.summary.update_labels(true, predicted)
        return len(true)

    def _class_indices(self, labels: Sequence[Any]) -> np.ndarray:
        names = list(self.plan.labels)
        out = np.empty(len(labels), dtype=np.int64)
        for i, label in enumerate(labels):  # labels arrive rarely and few at a time
            if isinstance(label, bool):
                raise InputError(f"label {label!r} is not a class")
            if isinstance(label, int | np.integer) and 0 <= int(label) < len(names):
                out[i] = int(label)
            elif str(label) in names:
                out[i] = names.index(str(label))
            else:
                raise InputError(f"label {label!r} is not one of the classes {names} or an index into them")
        if len(out) == 0:
            raise InputError("no labels given")
        return out

    def close(self, now: float) -> WindowSummary:
        """End the open window at `now`; returns its summary and opens the next one."""
        with self._lock:
            self._flush()
            closed = self.summary
            closed.window_end = max(float(now), closed.window_start)
            self.summary = self._zero(closed.window_end, closed.seq + 1)
        return closed
