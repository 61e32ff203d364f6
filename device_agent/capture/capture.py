"""The `Capture` facade the agent calls, and `start_capture`, which wires one to a running agent.

    capture = start_capture(agent, link, settings.capture, deploy=settings.deploy, mqtt=settings.mqtt)
    # agent.predict(...) now calls capture.offer(...); agent.feed_labels(..., request_id=...) capture.label(...)

`offer` runs inside `Agent.predict`: when nothing is sampled it costs one draw per row from the
generator under a lock; the rows kept are encoded (the input row as float32 little-endian bytes in
base64, the output row, the predicted class) and written to the spool in one durable transaction before
`predict` returns. A capture failure (the disk is full) is logged and counted, never raised into
`predict`. `label` fills the label of a request's captured rows (or queues label updates for rows
already uploaded). Fleet requests (`on_message`, the MQTT network thread) add rows to capture, each
request id once.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from device_agent.capture.config import CaptureSettings, check_capture, tls_files
from device_agent.capture.request import parse_capture_request
from device_agent.capture.sampler import DAY_S, Sampler, utc_day
from device_agent.capture.store import DB_NAME, CaptureStore, NewRecord
from device_agent.capture.uploader import Uploader
from device_agent.errors import ConfigError, PayloadError, SpoolError
from device_agent.uplink.connection import MessageHandler
from device_agent.uplink.https import TlsFiles, client_tls_context
from device_agent.uplink.wire import capture_topic

if TYPE_CHECKING:
    from device_agent.agent import Agent

log = logging.getLogger(__name__)

_LE_FLOAT32 = np.dtype("<f4")
MAX_WIRE_REQUEST_ID = 128  # the fleet's limit on a record's request id (edge_kit.fleet.captures.validation)
MAX_CALLS_REMEMBERED = 65_536  # request ids whose newest call is remembered for labels (~150 bytes each)
MAX_REASON_CHARS = 200


def wire_request_id(request_id: str | None) -> str | None:
    """The request id as a record carries it: the fleet takes 1 to 128 printable characters, so a longer or
    unprintable id (the agent's HTTP API allows 256 of any) goes as null rather than have the record
    refused. The spool keeps the full id, so labels naming it still find the record."""
    if request_id is None or not 0 < len(request_id) <= MAX_WIRE_REQUEST_ID or not request_id.isprintable():
        return None
    return request_id


class Subscriber(Protocol):
    """The part of a transport capture needs (`MqttPublisher`, `MemoryPublisher`)."""

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None: ...


class Capture:
    """Sampling, the spool, fleet requests and the uploader of one agent (docs/captures.md)."""

    def __init__(self, settings: CaptureSettings, *, fleet: str, device_id: str, store: CaptureStore,
                 uploader: Uploader | None = None, seed: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.fleet, self.device_id = fleet, device_id
        self.store = store
        self.uploader = uploader
        self._clock = clock
        state = store.counters()
        self.sampler = Sampler(settings.fraction, settings.bytes_per_day, seed=seed,
                               requested=state["requested_remaining"], day=state["budget_day"],
                               used=state["budget_used"])
        self._lock = threading.Lock()  # the sampler's generator and state (never held while writing)
        store.state_source = self._state
        self._closed = False
        self._errors = 0  # records lost because the spool could not store them
        # request id -> the time of its newest predict call (a reused id names its newest call)
        self._calls: OrderedDict[str, float] = OrderedDict()
        self.last_error: str | None = None
        self.requests = {"received": 0, "honoured": 0, "repeated": 0, "ignored": 0}
        self.invalid: dict[str, int] = {}
        self.last_invalid: str | None = None

    # -- predictions in -----------------------------------------------------------------------------

    def offer(self, inputs: np.ndarray, outputs: np.ndarray, classes: np.ndarray, request_id: str | None,
              window_start: float, model_sha256: str) -> int:
        """A predicted batch (float32 inputs as the model received them, outputs, predicted classes):
        spool the rows the sampler keeps. Returns how many rows were captured."""
        with self._lock:
            if self._closed:
                return 0
            now = None
            if request_id is not None:  # labels for this id will name this call, its newest
                now = self._clock()
                self._calls[request_id] = now
                self._calls.move_to_end(request_id)
                if len(self._calls) > MAX_CALLS_REMEMBERED:
                    self._calls.popitem(last=False)
            rows, _ = self.sampler.choose(len(inputs))
            if rows is None:
                return 0
            if now is None:
                now = self._clock()
            finite = rows[np.isfinite(outputs[rows]).all(axis=1)].tolist()
            kept = self.sampler.within_budget(len(finite), int(inputs[0].nbytes), now)
        # Outside the lock: a prediction that keeps nothing never waits for another one's disk write.
        adds = {"skipped_nonfinite": len(rows) - len(finite), "skipped_budget": len(finite) - kept}
        if not kept:
            self.store.defer(adds=adds)
            return 0
        records = [self._record(inputs, outputs, classes, i, request_id, window_start, model_sha256, now)
                   for i in finite[:kept]]
        try:
            self.store.put(records, adds={"captured": kept, **adds})
        except SpoolError as exc:
            with self._lock:
                self._errors += len(records)
            if str(exc) != self.last_error:
                log.error("capture: %s (%d records lost)", exc, len(records))
            self.last_error = str(exc)
            return 0
        return kept

    def _state(self) -> dict[str, int]:
        """The sampler's state as the spool keeps it (read without the lock: three current integers)."""
        sampler = self.sampler
        return {"budget_day": sampler.day, "budget_used": sampler.used, "requested_remaining": sampler.requested}

    @staticmethod
    def _record(inputs: np.ndarray, outputs: np.ndarray, classes: np.ndarray, i: int, request_id: str | None,
                window_start: float, model_sha256: str, now: float) -> NewRecord:
        row = np.ascontiguousarray(inputs[i], dtype=_LE_FLOAT32)
        record_id = secrets.token_hex(16)
        doc = {
            "id": record_id, "created": now, "request_id": wire_request_id(request_id), "row": i,
            "window_start": float(window_start), "model_sha256": model_sha256,
            "input": {"dtype": "float32", "shape": list(row.shape), "data": base64.b64encode(row.tobytes()).decode()},
            "output": outputs[i].tolist(), "predicted": int(classes[i]), "label": None,
        }
        return NewRecord(record_id, request_id, i, now, json.dumps(doc, allow_nan=False, separators=(",", ":")))

    def label(self, request_id: str, labels: Sequence[str]) -> int:
        """Ground truth (class names, `labels[row]`) for the captured rows of `request_id`; returns how many
        captured rows it labelled (in the spool, or queued as label updates when already uploaded)."""
        with self._lock:
            created = self._calls.get(request_id)
        if self._closed or created is None:
            return 0  # no call with this id since this process started: nothing of it was captured
        try:
            spooled, queued = self.store.label(request_id, [str(x) for x in labels], created)
        except SpoolError as exc:
            log.error("capture: labels for request %r not kept: %s", request_id[:64], exc)
            self.last_error = str(exc)
            return 0
        return spooled + queued

    # -- fleet requests -----------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT handler for this device's `capture` topic (network thread): honour a request once."""
        if not payload:
            return  # the fleet cleared the topic
        self.requests["received"] += 1
        try:
            request = parse_capture_request(payload, fleet=self.fleet, device=self.device_id)
        except PayloadError as exc:
            self.invalid[exc.kind] = self.invalid.get(exc.kind, 0) + 1
            self.last_invalid = str(exc)[:MAX_REASON_CHARS]
            log.warning("ignoring a capture request on %s: %s", topic, exc)
            return
        if not self.settings.fleet_requests:
            self.requests["ignored"] += 1
            log.info("capture request %s ignored: capture.fleet_requests is false", request.request)
            return
        self.honour(request.request, request.samples, reason=request.reason)

    def honour(self, request_id: str, samples: int, reason: str = "") -> bool:
        """Capture the next min(samples, max_requested) predicted rows, once per request id."""
        added = min(samples, self.settings.max_requested)
        with self._lock:
            if self._closed:
                return False
            try:
                new = self.store.honour(request_id, added, self.sampler.requested + added, self._clock())
            except SpoolError as exc:
                log.error("capture request %s not recorded, ignored for now: %s", request_id, exc)
                return False
            if new:
                self.sampler.requested += added
        if new:
            self.requests["honoured"] += 1
            log.info("capture request %s: capturing the next %d rows (%s)", request_id, added, reason[:100])
        else:
            self.requests["repeated"] += 1
        return new

    # -- status and lifecycle -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `capture` block of the agent's status."""
        counters = self.store.counters()
        pending = self.store.pending()
        day = counters["budget_day"]
        out: dict[str, Any] = {name: counters[name] for name in (
            "captured", "uploaded", "rejected", "dropped_full", "skipped_budget", "skipped_nonfinite",
            "labels_queued", "labels_sent", "labels_dropped", "requests_honoured")}
        out.update(
            write_errors=self._errors,
            pending_records=pending["records"], pending_bytes=pending["bytes"], pending_labels=pending["labels"],
            requested_remaining=counters["requested_remaining"],
            budget={"day": time.strftime("%Y-%m-%d", time.gmtime(day * DAY_S)),
                    "used_bytes": counters["budget_used"] if day == utc_day(self._clock()) else 0,
                    "bytes_per_day": self.settings.bytes_per_day},
            fraction=self.settings.fraction,
            requests={**self.requests, "invalid": dict(self.invalid), "last_invalid": self.last_invalid},
            spool=str(self.store.path), spool_bytes=self.store.max_bytes,
            last_error=self.last_error,
        )
        out.update(self.uploader.status() if self.uploader is not None
                   else {"last_upload": None, "last_upload_error": None, "failures_in_a_row": 0})
        return out

    def start(self) -> None:
        if self.uploader is not None:
            self.uploader.start()

    def stop(self) -> None:
        """Stop uploading and close the spool (idempotent); spooled records wait for the next start."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.uploader is not None:
            self.uploader.stop()
        self.store.close()


def open_capture(settings: CaptureSettings, *, fleet: str, device_id: str, deploy: TlsFiles | None = None,
                 mqtt: TlsFiles | None = None, seed: int | None = None, timeout: float = 30.0,
                 clock: Callable[[], float] = time.time) -> Capture:
    """A `Capture` from `[capture]` (checked with `check_capture` first), its spool opened, not started."""
    check_capture(settings, deploy=deploy, mqtt=mqtt)
    assert settings.upload_url is not None  # check_capture
    context = None
    if settings.upload_url.startswith("https:"):
        tls = tls_files(settings, deploy, mqtt)

        def text(path: Path | None) -> str | None:
            return None if path is None else str(path)

        try:
            context = client_tls_context(ca_file=text(tls.ca_file), also_trust=text(tls.also_trust),
                                         certfile=text(tls.certfile), keyfile=text(tls.keyfile))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError("capture.certfile", f"cannot use the upload TLS files: {exc}") from None
    store = CaptureStore(settings.state_path() / DB_NAME, max_bytes=settings.spool_bytes)
    uploader = Uploader(store, url=settings.upload_url, device_id=device_id, token_file=settings.token_file,
                        context=context, batch_records=settings.batch_records, batch_bytes=settings.batch_bytes,
                        interval=settings.upload_interval, timeout=timeout, clock=clock)
    return Capture(settings, fleet=fleet, device_id=device_id, store=store, uploader=uploader, seed=seed, clock=clock)


def start_capture(agent: Agent, link: Subscriber | None, settings: CaptureSettings, *,
                  deploy: TlsFiles | None = None, mqtt: TlsFiles | None = None,
                  seed: int | None = None) -> Capture | None:
    """With `[capture] enabled`: open the capture, hook it into `agent` (`agent.capture`, the `capture` status
    block), subscribe to this device's capture topic (renewed on every reconnect, so the retained request
    comes again) and start uploading. Call before the link connects. Without it: None, and nothing is
    created, hooked or subscribed."""
    if not settings.enabled:
        return None
    capture = open_capture(settings, fleet=agent.fleet, device_id=agent.device_id, deploy=deploy, mqtt=mqtt,
                           seed=seed)
    agent.status_sources["capture"] = capture.status
    agent.capture = capture
    if link is not None:
        link.subscribe(capture_topic(agent.fleet, agent.device_id), capture.on_message, qos=1)
    capture.start()
    log.info("capture on: %.4g of predicted rows, %d bytes a day, spool %s, uploads to %s", settings.fraction,
             settings.bytes_per_day, capture.store.path, settings.upload_url)
    return capture
