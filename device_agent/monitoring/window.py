"""The open window: what the agent saw and predicted since the last window closed.

Cheap on the hot path: a prediction only copies its raw inputs and logits into a preallocated
buffer (a few microseconds); channel values and histograms are computed for a whole chunk at once,
vectorised, when the buffer fills or the window closes. A full buffer is handed to one background
worker thread and recording continues into a second buffer (double buffering), so the numpy pass
overlaps inference: ONNX Runtime and numpy's heavy loops both release the GIL, and with one ORT
thread per inference a second core is otherwise idle. At most one chunk is in flight; a second
full buffer waits for it (backpressure), and closing a window waits for it too.

Ground-truth labels come back later, for the most recent predictions made without a request id or
for one request id; they add to the confusion counts of the window that is open when they arrive,
and consume the predictions they label (labelled once at most; never more labels than predictions).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from device_agent.bundle.format import REFERENCE
from device_agent.errors import InputError, VerificationError
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import Reference
from device_agent.monitoring.summary import Histogrammer, WindowSummary

DEFAULT_CHUNK = 8192
# The buffer holds at most this many bytes of raw inputs: 8192 digits images are 2 MB, while a
# 224x224x3 camera model gets a chunk of a few images instead of gigabytes. Bigger chunks measured
# cheaper per sample (fixed per-flush costs amortised; sorting grows only as n log n).
CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_LABEL_MEMORY = 4096
# Predictions remembered under a request id, for labels that name it: bounded in bytes (ids
# included), oldest forgotten first, so clients cannot grow the agent by sending many or big requests.
DEFAULT_REQUEST_MEMORY_BYTES = 1024 * 1024
_STAGE_ROWS_MAX = 64  # bigger batches are copied into the buffer at once (a slice copy costs as little)
_FLOAT32 = np.dtype(np.float32)
_INT64 = np.dtype(np.int64)
_ENTRY_OVERHEAD = 96  # bytes an entry costs beyond its predictions and id (dict slot, small objects)

log = logging.getLogger(__name__)

_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _monitor_worker() -> ThreadPoolExecutor:
    """One worker thread for every monitor in the process (a device runs one model at a time)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-agent-monitor")
        return _worker


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
        request_memory_bytes: int = DEFAULT_REQUEST_MEMORY_BYTES,
        background: bool = True,
    ) -> None:
        self.plan = plan
        self.histogrammer = histogrammer
        self.fleet, self.device, self.model = fleet, device, dict(model)
        sample_bytes = 4 * int(np.prod(plan.input_shape))
        self._chunk = max(1, min(chunk, CHUNK_BYTES // max(1, sample_bytes)))
        width = n_outputs or len(plan.labels)
        self._buffers = [
            (np.empty((self._chunk, *plan.input_shape), dtype=np.float32), np.empty((self._chunk, width), np.float32))
            for _ in range(2 if background else 1)
        ]
        self._current = 0
        self._inputs, self._outputs = self._buffers[0]
        self._fill = 0  # rows recorded into the current buffer, staged ones included
        # Rows of small batches are staged as bytes (`ndarray.tobytes`: one copy each) and copied into
        # the buffer when it is summarised: on the digits model at batch 1 three numpy slice
        # assignments per prediction cost twice what three tobytes() calls do, next to an ONNX Runtime
        # run. Staged rows are always the buffer's last ones, in order.
        self._staged_in: list[bytes] = []
        self._staged_out: list[bytes] = []
        self._staged_from = 0  # buffer row of the first staged row
        self._recorded = 0  # inferences in the open window, wherever they are (buffer, worker, summary)
        self._pending: Future[None] | None = None
        self._background = background
        self._lock = threading.Lock()
        self._summary_lock = threading.Lock()  # the worker's updates vs labels and closing
        self._recent = np.zeros(label_memory, dtype=np.int64)  # ring of predicted classes
        self._recent_size = label_memory
        self._recent_next = 0
        self._recent_count = 0
        self._recent_staged: list[tuple[int, bytes]] = []  # ring writes not yet done: (start, classes)
        self._requests: OrderedDict[str, np.ndarray] = OrderedDict()
        self._request_bytes = 0
        self._request_budget = request_memory_bytes
        self.summary = self._zero(window_start, seq)

    def _zero(self, start: float, seq: int) -> WindowSummary:
        return WindowSummary.zero(
            self.histogrammer, fleet=self.fleet, device=self.device, model=self.model,
            window_start=start, seq=seq, label_names=list(self.plan.labels),
        )

    @property
    def n(self) -> int:
        """Inferences in the open window, buffered ones included."""
        return self._recorded

    def record(self, raw: np.ndarray, outputs: np.ndarray, predicted: np.ndarray, request_id: str | None) -> None:
        """Add one checked batch of raw inputs with its model outputs and predicted classes."""
        n = len(raw)
        with self._lock:
            self._recorded += n
            fill = self._fill
            if fill + n > self._chunk:
                self._hand_over()
                fill = 0
            if n >= self._chunk:
                self._wait_pending()
                self._apply(self.summary, self.plan.values_by_channel(raw, outputs, predicted), raw)
            elif raw.dtype is _FLOAT32 and outputs.dtype is _FLOAT32 and n <= _STAGE_ROWS_MAX:
                self._staged_in.append(raw.tobytes())  # C order whatever the layout: the buffer's rows
                self._staged_out.append(outputs.tobytes())
                self._fill = fill + n
            else:
                self._stage()
                self._inputs[fill : fill + n] = raw
                self._outputs[fill : fill + n] = outputs
                self._fill = fill + n
                self._staged_from = fill + n
            start = self._recent_next
            end = start + n
            if request_id is None and end < self._recent_size and predicted.dtype is _INT64:  # the hot path
                self._recent_staged.append((start, predicted.tobytes()))
                self._recent_next = end
                count = self._recent_count + n
                self._recent_count = count if count < self._recent_size else self._recent_size
            else:
                self._remember(predicted, request_id)

    def _stage(self) -> None:
        """Copy the staged rows into the buffer (after the rows already there)."""
        if self._staged_in:
            lo, hi = self._staged_from, self._fill
            inputs, outputs = self._inputs[lo:hi], self._outputs[lo:hi]
            inputs[...] = np.frombuffer(b"".join(self._staged_in), np.float32).reshape(inputs.shape)
            outputs[...] = np.frombuffer(b"".join(self._staged_out), np.float32).reshape(outputs.shape)
            self._staged_in.clear()
            self._staged_out.clear()
        self._staged_from = self._fill

    def _sync_recent(self) -> None:
        """Do the ring writes the hot path left staged, in order (none of them wraps)."""
        for start, data in self._recent_staged:
            classes = np.frombuffer(data, np.int64)
            self._recent[start : start + len(classes)] = classes
        self._recent_staged.clear()

    def _hand_over(self) -> None:
        """Summarise the filled buffer (in the background when enabled) and switch to the other one."""
        self._stage()
        self._sync_recent()  # bounds the staged ring writes to a chunk's predictions
        k = self._fill
        if not k:
            return
        inputs, outputs = self._inputs[:k], self._outputs[:k]
        self._wait_pending()  # the other buffer is free again only once its chunk is done
        if self._background:
            self._pending = _monitor_worker().submit(self._summarise, self.summary, inputs, outputs)
            self._current ^= 1
            self._inputs, self._outputs = self._buffers[self._current]
        else:
            self._summarise(self.summary, inputs, outputs)
        self._fill = self._staged_from = 0

    def _summarise(self, summary: WindowSummary, inputs: np.ndarray, outputs: np.ndarray) -> None:
        # The predicted classes are recomputed here (one argmax per chunk) rather than copied per call.
        self._apply(summary, self.plan.values_by_channel(inputs, outputs), inputs)

    def _apply(self, summary: WindowSummary, columns: np.ndarray, raw: np.ndarray) -> None:
        with self._summary_lock:
            summary.update_by_channel(self.histogrammer, columns)
            summary.count_inputs(raw)

    def _wait_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except Exception:  # a failed chunk must not fail the requests that come after it
                log.exception("summarising a chunk of predictions failed; its counts are missing")

    def _remember(self, predicted: np.ndarray, request_id: str | None) -> None:
        if request_id is not None:  # kept apart from the ring: labelled by id only, never twice
            self._remember_request(predicted, request_id)
            return
        self._sync_recent()
        size = len(self._recent)
        p = predicted[-size:]
        start = self._recent_next
        if start + len(p) <= size:  # the usual case: one slice, no index arithmetic
            self._recent[start : start + len(p)] = p
        else:
            self._recent[(start + np.arange(len(p))) % size] = p
        self._recent_next = (start + len(p)) % size
        self._recent_count = min(size, self._recent_count + len(p))

    def _remember_request(self, predicted: np.ndarray, request_id: str) -> None:
        self._forget_request(request_id)  # a reused id names the newest request
        kept = predicted.astype(np.int32)
        cost = kept.nbytes + len(request_id) + _ENTRY_OVERHEAD
        if cost > self._request_budget:
            log.debug("request %r has too many samples to remember for labels", request_id[:64])
            return
        self._requests[request_id] = kept
        self._request_bytes += cost
        while self._request_bytes > self._request_budget:
            self._forget_request(next(iter(self._requests)))

    def _forget_request(self, request_id: str) -> np.ndarray | None:
        kept = self._requests.pop(request_id, None)
        if kept is not None:
            self._request_bytes -= kept.nbytes + len(request_id) + _ENTRY_OVERHEAD
        return kept

    @property
    def remembered_request_bytes(self) -> int:
        return self._request_bytes

    @property
    def unlabelled_recent(self) -> int:
        """Predictions made without a request id that are remembered and not yet labelled."""
        return self._recent_count

    def remembers_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def check_labels(self, labels: Sequence[Any]) -> None:
        """Raise InputError for labels that are not this model's classes, consuming nothing."""
        self._class_indices(labels)

    @property
    def buffer_bytes(self) -> int:
        return sum(inputs.nbytes + outputs.nbytes for inputs, outputs in self._buffers)

    def release_buffers(self) -> None:
        """Give back the sample buffers of a model that no longer serves; its label memory stays.

        A prediction that still finishes on it afterwards is summarised at once instead of buffered
        (a chunk of 0 sends every batch down `record`'s direct path)."""
        with self._lock:
            self._stage()
            self._sync_recent()
            k = self._fill
            self._wait_pending()
            if k:
                self._summarise(self.summary, self._inputs[:k], self._outputs[:k])
                self._fill = self._staged_from = 0
            width = self._outputs.shape[1]
            empty = (np.empty((0, *self.plan.input_shape), np.float32), np.empty((0, width), np.float32))
            self._buffers, self._current, self._chunk = [empty], 0, 0
            self._inputs, self._outputs = empty

    def feed_labels(self, labels: Sequence[Any], request_id: str | None = None) -> int:
        """Ground truth for the most recent unlabelled predictions made without a request id, or for one
        request's; returns how many were counted. Labels consume what they label: a prediction is
        labelled at most once, so there are never more labels than predictions."""
        true = self._class_indices(labels)
        with self._lock:
            if request_id is not None:
                predicted = self._requests.get(request_id)
                if predicted is None:
                    raise InputError(f"unknown, expired or already labelled request id {request_id!r}")
                if len(predicted) != len(true):
                    raise InputError(f"request {request_id!r} had {len(predicted)} samples, got {len(true)} labels")
                self._forget_request(request_id)
            else:
                if len(true) > self._recent_count:
                    raise InputError(f"{len(true)} labels but only {self._recent_count} unlabelled recent "
                                     "predictions remembered")
                self._sync_recent()
                size = len(self._recent)
                idx = (self._recent_next - len(true) + np.arange(len(true))) % size
                predicted = self._recent[idx]
                self._recent_next = (self._recent_next - len(true)) % size
                self._recent_count -= len(true)
            with self._summary_lock:
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
            self._stage()
            k = self._fill
            self._wait_pending()
            if k:
                self._summarise(self.summary, self._inputs[:k], self._outputs[:k])
                self._fill = self._staged_from = 0
            closed = self.summary
            closed.window_end = max(float(now), closed.window_start)
            self.summary = self._zero(closed.window_end, closed.seq + 1)
            self._recorded = 0
        return closed
