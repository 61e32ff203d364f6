"""The embeddable agent: a verified model, windowed summaries, hot updates, and status.

    agent = Agent("model.edgebundle", public_key=key, device_id="cam-7")
    result = agent.predict(batch)          # outputs (logits) and predicted labels
    agent.feed_labels(["3", "7"])          # ground truth for the two most recent predictions
    agent.close_window()                   # normally done by `start()`'s timer every window_seconds

A bundle is verified (signature, every hash), loaded, and self-tested before it serves; `update`
does the same for a new bundle and swaps it in only when all of that passed, so a bad update leaves
the previous model serving and the reason in `status()`. Which bundle may serve (one product, only
up, the one deliberate way down through `rollback_to`) is `bundle.selection`'s rule; the agent asks
it. Without a forwarder (no MQTT), closed windows are kept in `closed_windows` for the embedding
application.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle.format import MODEL, REFERENCE, read_bundle
from device_agent.bundle.selection import BundleSelection, Versioned, resolve_bundle
from device_agent.bundle.signing import check_signature_settings
from device_agent.deploy.serving import ServingStats
from device_agent.errors import EdgeKitError, InputError, VerificationError
from device_agent.host import cpu_model, int8_isa
from device_agent.monitoring.summary import Histogrammer, WindowSummary
from device_agent.monitoring.summary_codec import CONTENT_TYPE_JSON
from device_agent.monitoring.window import DEFAULT_REQUEST_MEMORY_BYTES, WindowMonitor, histogrammer_for
from device_agent.runtime import ModelRuntime
from device_agent.uplink import wire
from device_agent.uplink.forwarder import Forwarder
from device_agent.uplink.transport import Message

__all__ = ["Agent", "LoadedModel", "Prediction", "load_model"]

log = logging.getLogger(__name__)

SEQ_META = "next_seq"
_perf_counter = time.perf_counter


class CaptureHook(Protocol):
    """Field capture as the agent sees it (`device_agent.capture.Capture`, hooked in by `start_capture`)."""

    def offer(self, inputs: np.ndarray, outputs: np.ndarray, classes: np.ndarray, request_id: str | None,
              window_start: float, model_sha256: str) -> int: ...

    def label(self, request_id: str, labels: Sequence[str]) -> int: ...

    def stop(self) -> None: ...


@dataclass(slots=True)
class Prediction:
    outputs: np.ndarray  # (n, classes) logits
    classes: np.ndarray  # (n,) predicted class indices
    label_names: list[str]  # the model's class names
    request_id: str | None = None

    @property
    def labels(self) -> list[str]:
        """Predicted class names (built on demand: the hot path does not need them)."""
        return [self.label_names[i] for i in self.classes.tolist()]


@dataclass(frozen=True)
class LoadedModel:
    """A bundle that passed verification and its self-test, ready to serve."""

    path: Path
    runtime: ModelRuntime
    histogrammer: Histogrammer
    signed_by: str | None
    selftest: dict[str, Any]


def load_model(path: str | Path, *, public_key: Ed25519PublicKey | None = None, require_signature: bool = False,
               intra_op_threads: int = 1) -> LoadedModel:
    """Verify, load, warm up and self-test a bundle; raises VerificationError naming what failed.

    `require_signature` without a `public_key` is a UsageError: there would be nothing to check a
    signature against. A directory stands for its newest *.edgebundle file."""
    check_signature_settings(public_key, require_signature)
    bundle = read_bundle(resolve_bundle(path), public_key=public_key, require_signature=require_signature)
    runtime = ModelRuntime(bundle, intra_op_threads=intra_op_threads)
    warm = runtime.run(np.zeros((1, *runtime.sample_shape), dtype=np.float32))
    if warm.ndim != 2 or warm.shape[1] != runtime.n_classes:
        raise VerificationError(MODEL, f"model output shape {warm.shape} does not match {runtime.n_classes} labels")
    selftest = runtime.self_test()
    if REFERENCE not in bundle.members:
        raise VerificationError(REFERENCE, "missing: the agent needs the reference histograms' bin edges")
    histogrammer = histogrammer_for(runtime.plan, bundle.reference)
    return LoadedModel(bundle.path, runtime, histogrammer, bundle.signed_by, selftest)


class Agent:
    def __init__(
        self,
        bundle: str | Path | LoadedModel,
        *,
        public_key: Ed25519PublicKey | None = None,
        require_signature: bool = False,
        allow_downgrade: bool = False,
        model_name: str | None = None,
        fleet: str = "default",
        device_id: str = "local",
        window_seconds: float = 60.0,
        forwarder: Forwarder | None = None,
        compress: bool = True,
        intra_op_threads: int = 1,
        monitoring: bool = True,
        request_memory_bytes: int = DEFAULT_REQUEST_MEMORY_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self.selection = BundleSelection(public_key=public_key, require_signature=require_signature,
                                         allow_downgrade=allow_downgrade, model_name=model_name)
        self.fleet, self.device_id = fleet, device_id
        self.window_seconds = float(window_seconds)
        self.forwarder = forwarder
        self.compress = compress
        self.intra_op_threads = intra_op_threads
        self.monitoring = monitoring
        self.request_memory_bytes = request_memory_bytes  # predictions kept for labels naming a request id
        self._clock = clock
        self.closed_windows: deque[WindowSummary] = deque(maxlen=100)
        self.started_at = clock()
        self._counters = {"predictions": 0, "requests": 0, "bad_requests": 0, "windows_closed": 0, "labels": 0}
        self._counter_lock = threading.Lock()
        self._update_lock = threading.Lock()
        # Labels are split between the serving and the retired monitor in one step (and never while a
        # window of either closes), so none land in a monitor that is about to be dropped.
        self._label_lock = threading.Lock()
        self._stopping = threading.Event()
        self._timer: threading.Thread | None = None
        self._retired: WindowMonitor | None = None
        self.last_update: dict[str, Any] | None = None
        # Requests, failures and latency of the model now serving (reset at each swap): canary figures.
        self.serving = ServingStats(self._counter_lock)
        self.serving.reset(self.started_at)
        # More top-level blocks of the status document, by key (the deployment updater adds its own).
        self.status_sources: dict[str, Callable[[], Any]] = {}
        # Field capture (docs/captures.md): None unless `[capture]` is enabled, so predict pays one check.
        self.capture: CaptureHook | None = None
        self._host = {"cpu": cpu_model(), "int8_isa": int8_isa()}
        if forwarder is not None:
            forwarder.status_source = self.status_message

        if isinstance(bundle, LoadedModel):
            self.selection.check_product(bundle.runtime.info, bundle.path)
            self.selection.pin(bundle.runtime.info)
            loaded = bundle
        else:
            loaded = self.selection.select_at_startup(bundle, self._load, _info, clock())
        if self.selection.last_refusal is not None:
            self.last_update = {"ok": False, **self.selection.last_refusal.as_dict()}
        seq = forwarder.spool.get_meta(SEQ_META) if forwarder is not None else 0
        self._active = loaded
        self._monitor = self._new_monitor(loaded, clock(), seq)
        log.info("serving %s %s (sha256 %s, self-test %s)", loaded.runtime.info.name, loaded.runtime.info.version,
                 loaded.runtime.info.sha256[:12], loaded.selftest)

    # -- topics ------------------------------------------------------------------------------------

    @property
    def summary_topic(self) -> str:
        return wire.summary_topic(self.fleet, self.device_id)

    @property
    def status_topic(self) -> str:
        return wire.status_topic(self.fleet, self.device_id)

    @property
    def model(self) -> LoadedModel:
        return self._active

    def _load(self, path: str | Path) -> LoadedModel:
        s = self.selection
        return load_model(path, public_key=s.public_key, require_signature=s.require_signature,
                          intra_op_threads=self.intra_op_threads)

    def _refuse(self, path: str | Path, exc: EdgeKitError, at: float) -> None:
        self.last_update = {"ok": False, **self.selection.reject(path, exc, at).as_dict()}

    def _new_monitor(self, loaded: LoadedModel, start: float, seq: int) -> WindowMonitor:
        return WindowMonitor(
            loaded.runtime.plan, loaded.histogrammer, fleet=self.fleet, device=self.device_id,
            model=loaded.runtime.info.as_dict(), window_start=start, seq=seq,
            request_memory_bytes=self.request_memory_bytes,
        )

    # -- inference ---------------------------------------------------------------------------------

    def predict(self, inputs: Any, request_id: str | None = None) -> Prediction:
        """Run a batch (or one sample) of RAW inputs; raises InputError for a bad request (counted)."""
        runtime, monitor = self._active.runtime, self._monitor
        began = _perf_counter()
        try:
            batch = runtime.as_batch(inputs)
        except InputError:
            self._count(bad_requests=1)
            self.serving.record(0.0, ok=False)
            raise
        try:
            outputs = runtime.run(batch)
        except Exception:
            self.serving.record(0.0, ok=False)
            raise
        seconds = _perf_counter() - began
        classes = outputs.argmax(axis=1)
        if self.monitoring:
            monitor.record(batch, outputs, classes, request_id)
        capture = self.capture
        if capture is not None:  # on disk before predict returns (a failure is logged there, never raised)
            capture.offer(batch, outputs, classes, request_id, monitor.summary.window_start, runtime.info.sha256)
        with self._counter_lock:  # the serving figures share it: one acquisition per request
            counters = self._counters
            counters["predictions"] += len(batch)
            counters["requests"] += 1
            self.serving.record_ok_locked(seconds)
        return Prediction(outputs, classes, runtime.labels, request_id)

    def feed_labels(self, labels: Sequence[Any], request_id: str | None = None) -> int:
        """Ground truth for the latest predictions (or for `request_id`'s); updates confusion counts.

        After a hot swap the latest predictions may still be the previous model's: each label goes to
        the model that made its prediction (the oldest of the latest to the previous one), so it counts
        against that version, in windows under its sha256."""
        try:
            with self._label_lock:
                counted = self._feed_labels(labels, request_id)
        except InputError:
            self._count(bad_requests=1)
            raise
        self._count(labels=counted)
        capture = self.capture
        if capture is not None and request_id is not None:
            capture.label(request_id, class_names(labels, self._active.runtime.labels))
        return counted

    def _feed_labels(self, labels: Sequence[Any], request_id: str | None) -> int:
        current, retired = self._monitor, self._retired
        if retired is None:
            return current.feed_labels(labels, request_id)
        if request_id is not None:
            if retired.remembers_request(request_id) and not current.remembers_request(request_id):
                return retired.feed_labels(labels, request_id)
            return current.feed_labels(labels, request_id)
        newer = current.unlabelled_recent
        if len(labels) <= newer:
            return current.feed_labels(labels)
        remembered = newer + retired.unlabelled_recent
        if len(labels) > remembered:
            raise InputError(f"{len(labels)} labels but only {remembered} unlabelled recent predictions remembered")
        split = len(labels) - newer
        older, latest = labels[:split], labels[split:]
        retired.check_labels(older)  # both halves checked before either is consumed
        if newer:
            current.check_labels(latest)
        counted = retired.feed_labels(older)
        return counted + (current.feed_labels(latest) if newer else 0)

    def count_bad_request(self) -> None:
        """For front ends that refuse a request before it reaches `predict` (unparsable body)."""
        self._count(bad_requests=1)
        self.serving.record(0.0, ok=False)

    def _count(self, **deltas: int) -> None:
        with self._counter_lock:
            for key, delta in deltas.items():
                self._counters[key] += delta

    # -- windows -----------------------------------------------------------------------------------

    def close_window(self, now: float | None = None) -> WindowSummary | None:
        """Close the open window; spool it (or keep it) unless nothing happened in it. Returns it."""
        with self._update_lock:  # never at the same time as a swap
            t = self._clock() if now is None else now
            if self._retired is not None:
                with self._label_lock:
                    # Predictions that were already running on the old model when it was swapped out,
                    # and labels that came back for its predictions, landed in its monitor after its
                    # last window closed: ship them too, under its sha256. It stays for late labels
                    # until all it remembers is labelled or the next swap retires another.
                    self._ship(self._close_monitor(self._retired, t))
                    if not self._retired.unlabelled_recent and not self._retired.remembered_request_bytes:
                        self._retired = None
                    else:  # kept for labels only: its sample buffers (megabytes) go
                        self._retired.release_buffers()
            closed = self._close_monitor(self._monitor, t)
            self._ship(closed)
        return closed if closed.n or closed.confusion is not None else None

    def _close_monitor(self, monitor: WindowMonitor, at: float) -> WindowSummary:
        """Close `monitor`'s window and count it in one step under the counter lock: a status read
        between the two showed the window gone (open_n 0) but not yet in windows_closed, and a caller
        waiting for "all windows closed" took that torn snapshot as final (the broker-outage test's rare
        load-only failure: 81 inferences at the subscriber, 96 answered)."""
        with self._counter_lock:
            closed = monitor.close(at)
            if closed.n or closed.confusion is not None:
                self._counters["windows_closed"] += 1
        return closed

    def _ship(self, closed: WindowSummary) -> None:
        if self.forwarder is not None:
            self.forwarder.spool.set_meta(SEQ_META, closed.seq + 1)
        if closed.n == 0 and closed.confusion is None:
            return  # an idle window says nothing the status message does not
        if self.forwarder is None:
            self.closed_windows.append(closed)
            return
        payload, content_type = closed.to_bytes(compress=self.compress)
        key = f"{closed.device}|{closed.model['sha256']}|{closed.window_start!r}"
        self.forwarder.submit(key, Message(self.summary_topic, payload, content_type, qos=1))
        self.publish_status()

    def window_due(self, now: float | None = None) -> bool:
        t = self._clock() if now is None else now
        return t - self._monitor.summary.window_start >= self.window_seconds

    # -- hot update --------------------------------------------------------------------------------

    def update(self, path: str | Path) -> dict[str, Any]:
        """Verify, load and self-test a new bundle, then swap it in; on failure keep serving the old one.

        The bundle must be this agent's product and a higher version (`BundleSelection.check_update`);
        raises VerificationError (exit 4) naming why not, with the reason also in `status()`."""
        return self._swap(path, self.selection.check_update, "update")

    def rollback_to(self, path: str | Path) -> dict[str, Any]:
        """Return to a kept bundle: the one path allowed to go down a version.

        The bundle is verified, loaded and self-tested exactly like an update and must be the same
        product; only the version rule is lifted (`BundleSelection.check_rollback`). On failure the
        agent keeps serving and raises VerificationError like `update`. The result is `update`'s,
        with `"action": "rollback"`."""
        return self._swap(path, self.selection.check_rollback, "rollback")

    def _swap(self, path: str | Path, check: Callable[[Versioned, Versioned, str | Path], None],
              action: str) -> dict[str, Any]:
        with self._update_lock:
            at = self._clock()
            old = self._active
            try:
                loaded = self._load(path)
                same = loaded.runtime.info.sha256 == old.runtime.info.sha256
                if not same:
                    check(old.runtime.info, loaded.runtime.info, path)
            except EdgeKitError as exc:
                self._refuse(path, exc, at)
                log.error("%s from %s refused, still serving %s: %s", action, path,
                          self._active.runtime.info.sha256[:12], exc)
                self.publish_status()
                raise
            self.selection.accepted(path)
            if same:
                self.last_update = {"ok": True, "action": action, "path": str(path), "changed": False, "at": at}
                return self.last_update
            old_monitor = self._monitor
            with self._label_lock:
                if self._retired is not None:  # the version before: what it still holds ships now
                    self._ship(self._close_monitor(self._retired, at))
                closed = self._close_monitor(old_monitor, at)
                self._retired = old_monitor
                self._monitor = self._new_monitor(loaded, closed.window_end, closed.seq + 1)
            self._active = loaded
            self.serving.reset(at)
            self._ship(closed)
            self.last_update = {
                "ok": True, "action": action, "path": str(path), "changed": True, "at": at,
                "from": old.runtime.info.as_dict(), "to": loaded.runtime.info.as_dict(), "selftest": loaded.selftest,
            }
            log.info("%s: swapped in %s %s (sha256 %s)", action, loaded.runtime.info.name, loaded.runtime.info.version,
                     loaded.runtime.info.sha256[:12])
        self.publish_status()
        return self.last_update

    # -- status ------------------------------------------------------------------------------------

    def status(self, state: str = "online") -> dict[str, Any]:
        active = self._active
        with self._counter_lock:  # one snapshot: a window closes and is counted under this lock too
            counters = dict(self._counters)
            window = {"seconds": self.window_seconds, "seq": self._monitor.summary.seq, "open_n": self._monitor.n}
        doc: dict[str, Any] = {
            "state": state,
            "fleet": self.fleet,
            "device": self.device_id,
            "at": self._clock(),
            "uptime_s": round(self._clock() - self.started_at, 3),
            "model": active.runtime.info.as_dict(),
            "bundle": str(active.path),
            "signed_by": active.signed_by,
            "counters": counters,
            "window": window,
            "update": self.last_update,
            "rejected_bundles": [r.as_dict() for r in self.selection.rejected],
            "host": self._host,
            "serving": self.serving.as_dict(),
        }
        for key, source in self.status_sources.items():
            doc[key] = source()
        if self.forwarder is not None:
            doc["spool"] = self.forwarder.stats()
            doc["connected"] = self.forwarder.publisher.connected
            doc["broker_error"] = getattr(self.forwarder.publisher, "last_error", None)
        return doc

    def status_message(self, state: str = "online") -> Message:
        return Message(self.status_topic, json.dumps(self.status(state)).encode(), CONTENT_TYPE_JSON, qos=1,
                       retain=True)

    def publish_status(self) -> None:
        """Queue a retained status message (sent by the forwarder's thread once connected)."""
        if self.forwarder is not None:
            self.forwarder.request_status()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (if there is a forwarder) and close windows on a timer in a background thread."""
        if self.forwarder is not None:
            self.forwarder.publisher.set_on_connect(self._on_connect)
            self.forwarder.publisher.start()
            self.forwarder.start()
        self._timer = threading.Thread(target=self._window_loop, name="window-timer", daemon=True)
        self._timer.start()

    def _on_connect(self) -> None:
        # Runs on paho's network thread with paho's locks held: only signal, never publish here.
        self.publish_status()

    def _window_loop(self) -> None:
        tick = min(1.0, self.window_seconds / 4)
        while not self._stopping.wait(tick):
            if self.window_due():
                try:
                    self.close_window()
                except Exception:
                    log.exception("closing the window failed")

    def stop(self) -> dict[str, Any]:
        """Close the open window (so it is spooled, not lost), say offline, disconnect; the final status."""
        self._stopping.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        self.close_window()
        if self.capture is not None:
            self.capture.stop()  # spooled records wait for the next start
        if self.forwarder is not None:
            self.forwarder.stop()  # first, so this thread is the only one publishing from here on
            self.forwarder.pump()
            deadline = time.monotonic() + 2.0  # give the last PUBACKs a moment; unacked ones stay spooled
            while self.forwarder.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            final = self.status("offline")
            self.forwarder.publisher.stop(final=self.status_message("offline"))
            self.forwarder.spool.close()
            return final
        return self.status("offline")


def class_names(labels: Sequence[Any], names: Sequence[str]) -> list[str]:
    """Labels as class names: an integer is an index into `names` (the monitor's rule), anything else its text."""
    return [names[int(x)] if isinstance(x, int | np.integer) and not isinstance(x, bool) and 0 <= int(x) < len(names)
            else str(x) for x in labels]


def _info(loaded: LoadedModel) -> Versioned:
    return loaded.runtime.info
