"""The embeddable agent: a verified model, windowed summaries, hot updates, and status.

    agent = Agent("model.edgebundle", public_key=key, device_id="cam-7")
    result = agent.predict(batch)          # outputs (logits) and predicted labels
    agent.feed_labels(["3", "7"])          # ground truth for the two most recent predictions
    agent.close_window()                   # normally done by `start()`'s timer every window_seconds

A bundle is verified (signature, every hash), loaded, and self-tested before it serves; `update`
does the same for a new bundle and swaps it in only when all of that passed, so a bad update leaves
the previous model serving and the reason in `status()`. Without a forwarder (no MQTT), closed
windows are kept in `closed_windows` for the embedding application.
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
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle.format import MANIFEST, MODEL, REFERENCE, read_bundle, read_manifest
from device_agent.bundle.versions import is_upgrade, version_key
from device_agent.bundle.watcher import bundle_candidates, resolve_bundle
from device_agent.errors import EdgeKitError, InputError, VerificationError
from device_agent.host import cpu_model, int8_isa
from device_agent.monitoring.summary import Histogrammer, WindowSummary
from device_agent.monitoring.summary_codec import CONTENT_TYPE_JSON
from device_agent.monitoring.window import DEFAULT_REQUEST_MEMORY_BYTES, WindowMonitor, histogrammer_for
from device_agent.runtime import ModelRuntime
from device_agent.uplink import wire
from device_agent.uplink.forwarder import Forwarder
from device_agent.uplink.transport import Message

log = logging.getLogger(__name__)

SEQ_META = "next_seq"
MAX_REJECTED = 16  # refused bundles remembered for the status message, newest kept


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
               intra_op_threads: int = 0) -> LoadedModel:
    """Verify, load, warm up and self-test a bundle; raises VerificationError naming what failed."""
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
        fleet: str = "default",
        device_id: str = "local",
        window_seconds: float = 60.0,
        forwarder: Forwarder | None = None,
        compress: bool = True,
        intra_op_threads: int = 0,
        monitoring: bool = True,
        request_memory_bytes: int = DEFAULT_REQUEST_MEMORY_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self.public_key = public_key
        self.require_signature = require_signature or public_key is not None
        self.allow_downgrade = allow_downgrade
        self.rejected: dict[str, dict[str, Any]] = {}  # path -> why it was refused (status message)
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
        self._stopping = threading.Event()
        self._timer: threading.Thread | None = None
        self._retired: WindowMonitor | None = None
        self.last_update: dict[str, Any] | None = None
        self._host = {"cpu": cpu_model(), "int8_isa": int8_isa()}
        if forwarder is not None:
            forwarder.status_source = self.status_message

        loaded = bundle if isinstance(bundle, LoadedModel) else self._load_newest_good(bundle)
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

    def _load_newest_good(self, path: str | Path) -> LoadedModel:
        """At start-up, the best candidate that passes: a garbage file dropped in before a reboot does
        not keep the device down while the previous good bundle is still there, and (unless downgrades
        are allowed) an older version with a newer file date does not win over the newest version."""
        candidates = self._startup_order(bundle_candidates(path))
        for candidate in candidates[:-1]:
            try:
                return self._load(candidate)
            except EdgeKitError as exc:
                log.error("skipping %s at start-up: %s", candidate, exc)
                self._reject(candidate, exc, self._clock())
        return self._load(candidates[-1])

    def _startup_order(self, candidates: list[Path]) -> list[Path]:
        """Highest version first (newest file among equals); a candidate whose manifest already fails
        is reported and dropped. With allow_downgrade, simply the newest file first, as an operator
        rolling back expects."""
        if self.allow_downgrade or len(candidates) < 2:
            return candidates
        ranked: list[tuple[tuple[bool, Any], int, Path]] = []
        for i, candidate in enumerate(candidates):  # newest file first
            try:
                manifest, _ = read_manifest(candidate, public_key=self.public_key,
                                            require_signature=self.require_signature)
            except EdgeKitError as exc:
                log.error("skipping %s at start-up: %s", candidate, exc)
                self._reject(candidate, exc, self._clock())
                continue
            key = version_key(str(manifest["version"]))
            ranked.append(((key is not None, key or ()), -i, candidate))
        if not ranked:
            return candidates[-1:]  # every one is bad: loading the oldest raises the error to show
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return [c for _, _, c in ranked]

    def _reject(self, path: str | Path, exc: EdgeKitError, at: float) -> None:
        self.last_update = {"ok": False, "path": str(path), "error": str(exc), "at": at}
        self.rejected.pop(str(path), None)
        self.rejected[str(path)] = {"error": str(exc), "at": at}
        while len(self.rejected) > MAX_REJECTED:
            self.rejected.pop(next(iter(self.rejected)))

    def _check_not_downgrade(self, loaded: LoadedModel, path: str | Path) -> None:
        """Refuse another model name or a version that is not newer, unless allow_downgrade."""
        if self.allow_downgrade:
            return
        old, new = self._active.runtime.info, loaded.runtime.info
        where = f"(in {Path(path).name})"
        hint = "start the agent with --allow-downgrade (allow_downgrade = true) to accept it"
        if new.name != old.name:
            raise VerificationError(MANIFEST, f"bundle is model {new.name!r}, this agent serves {old.name!r} {where}",
                                    hint=hint)
        upgrade = is_upgrade(old.version, new.version)
        if upgrade is None:
            raise VerificationError(MANIFEST, f"cannot order version {new.version!r} after {old.version!r} {where}",
                                    hint=hint)
        if not upgrade:
            raise VerificationError(MANIFEST, f"version {new.version} is not newer than the {old.version} being "
                                              f"served (downgrade or a rebuilt version) {where}", hint=hint)

    def _load(self, path: str | Path) -> LoadedModel:
        return load_model(path, public_key=self.public_key, require_signature=self.require_signature,
                          intra_op_threads=self.intra_op_threads)

    def _new_monitor(self, loaded: LoadedModel, start: float, seq: int) -> WindowMonitor:
        return WindowMonitor(
            loaded.runtime.plan, loaded.histogrammer, fleet=self.fleet, device=self.device_id,
            model=loaded.runtime.info.as_dict(), window_start=start, seq=seq,
            request_memory_bytes=self.request_memory_bytes,
        )

    # -- inference ---------------------------------------------------------------------------------

    def predict(self, inputs: Any, request_id: str | None = None) -> Prediction:
        """Run a batch (or one sample) of RAW inputs; raises InputError for a bad request (counted)."""
        active, monitor = self._active, self._monitor
        try:
            batch = active.runtime.as_batch(inputs)
        except InputError:
            self._count(bad_requests=1)
            raise
        outputs = active.runtime.run(batch)
        classes = outputs.argmax(axis=1)
        if self.monitoring:
            monitor.record(batch, outputs, classes, request_id)
        with self._counter_lock:
            self._counters["predictions"] += len(batch)
            self._counters["requests"] += 1
        return Prediction(outputs, classes, active.runtime.labels, request_id)

    def feed_labels(self, labels: Sequence[Any], request_id: str | None = None) -> int:
        """Ground truth for the latest predictions (or for `request_id`'s); updates confusion counts."""
        try:
            counted = self._monitor.feed_labels(labels, request_id)
        except InputError:
            self._count(bad_requests=1)
            raise
        self._count(labels=counted)
        return counted

    def count_bad_request(self) -> None:
        """For front ends that refuse a request before it reaches `predict` (unparsable body)."""
        self._count(bad_requests=1)

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
                # Predictions that were already running on the old model when it was swapped out
                # landed in its monitor after its last window closed: ship them too, under its sha256.
                self._ship(self._close_monitor(self._retired, t))
                self._retired = None
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
        """Verify, load and self-test a new bundle, then swap it in; on failure keep serving the old one."""
        with self._update_lock:
            at = self._clock()
            old = self._active
            try:
                loaded = self._load(path)
                same = loaded.runtime.info.sha256 == old.runtime.info.sha256
                if not same:
                    self._check_not_downgrade(loaded, path)
            except EdgeKitError as exc:
                self._reject(path, exc, at)
                log.error("update from %s refused, still serving %s: %s", path, self._active.runtime.info.sha256[:12],
                          exc)
                self.publish_status()
                raise
            self.rejected.pop(str(path), None)
            if same:
                self.last_update = {"ok": True, "path": str(path), "changed": False, "at": at}
                return self.last_update
            old_monitor = self._monitor
            closed = self._close_monitor(old_monitor, at)
            self._monitor = self._new_monitor(loaded, closed.window_end, closed.seq + 1)
            self._active = loaded
            self._retired = old_monitor
            self._ship(closed)
            self.last_update = {
                "ok": True, "path": str(path), "changed": True, "at": at,
                "from": old.runtime.info.as_dict(), "to": loaded.runtime.info.as_dict(), "selftest": loaded.selftest,
            }
            log.info("swapped in %s %s (sha256 %s)", loaded.runtime.info.name, loaded.runtime.info.version,
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
            "rejected_bundles": [{"path": p, **r} for p, r in self.rejected.items()],
            "host": self._host,
        }
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
