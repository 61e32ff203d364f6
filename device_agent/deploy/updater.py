"""Acting on deployment messages: download, verify, self-test, swap, keep the previous bundle, roll back.

Folders (each agent has its own):

- `<state>/staging/`: downloads in progress (`<sha256>.part`) and complete, hash-checked files
  (`<sha256>.bundle`). Never watched, never served.
- `<bundles>/`: the folder the agent serves from (and watches). A bundle enters it only after its
  hash, signature, manifest and version checked out, under `<name>-<version>.edgebundle`, written
  atomically; the swap itself is `Agent.update`, which loads and self-tests it first.
- `<state>/kept/<sha256>.edgebundle`: bundles that served before, to return to (newest `keep`).
- `<state>/deployment.json`: the last report and the deployments already finished, so a retained
  message delivered again after a restart is not acted on twice.

Order of an install, each step reported on the status topic: `downloading` (resumable) ->
`verifying` (signature and manifest against the agent's own key, name and version as the message
says, the no-downgrade rule) -> into the bundles folder -> `Agent.update` (load, self-test, swap) ->
the bundle that served before moves to `kept/` -> `installed`. Any failure is `failed` with the
reason; the bundle that was serving keeps serving and a half-done file never reaches the bundles
folder (or is removed from it when the self-test refused it). A `rollback` returns only to a bundle
in `kept/` whose file hashes to the message's sha256, through `Agent.rollback_to`, the one path that
may go down a version; the bundle it leaves moves to `kept/` so a restart does not return to it.

A message arrives on the MQTT network thread; it is parsed there (invalid ones are counted and
ignored) and handed to the updater's own thread, newest message winning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from device_agent.atomic import atomic_file, atomic_write_bytes
from device_agent.bundle.format import bundle_filename, read_bundle
from device_agent.deploy.config import DeploySettings
from device_agent.deploy.download import DownloadFailed, DownloadPolicy, download, file_sha256, part_path
from device_agent.deploy.message import (
    DOWNLOADING,
    FAILED,
    INSTALL,
    INSTALLED,
    MAX_REASON_CHARS,
    ROLLED_BACK,
    VERIFYING,
    DeploymentMessage,
    DeploymentReport,
    parse_deployment_message,
    parse_deployment_report,
)
from device_agent.errors import EdgeKitError, PayloadError, VerificationError
from device_agent.uplink.connection import MessageHandler
from device_agent.uplink.https import TlsFiles
from device_agent.uplink.wire import deployment_topic

if TYPE_CHECKING:
    from device_agent.agent import Agent

log = logging.getLogger(__name__)

STATE_FILE = "deployment.json"
KEPT_SUFFIX = ".edgebundle"
PROGRESS_EVERY_S = 10.0  # status messages while downloading: a million devices must not flood the fleet
RETRY_AFTER_TRANSIENT_S = 30.0  # a download that gave up is tried again after this (or on the next message)
MAX_FINISHED = 64  # finished deployments remembered (a retained message is one per device; a few suffice)


class Subscriber(Protocol):
    """The part of a transport the updater needs (`MqttPublisher`, `MemoryPublisher`)."""

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None: ...


def download_policy(deploy: DeploySettings, mqtt: TlsFiles | None = None) -> DownloadPolicy:
    """How downloads run, from `[deploy]`; the TLS identity falls back to `[mqtt]`'s (the device's
    enrolled certificate, and the fleet CA trusted besides the system's CAs)."""
    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    certfile, keyfile = deploy.certfile, deploy.keyfile
    if certfile is None and mqtt is not None:
        certfile, keyfile = mqtt.certfile, mqtt.keyfile
    also_trust = mqtt.ca_certs if mqtt is not None and deploy.ca_certs is None else None
    return DownloadPolicy(timeout=deploy.download_timeout, give_up_after=deploy.give_up_after,
                          ca_file=text(deploy.ca_certs), also_trust=text(also_trust), certfile=text(certfile),
                          keyfile=text(keyfile))


def start_deployments(agent: Agent, link: Subscriber, deploy: DeploySettings, bundles_dir: Path,
                      mqtt: TlsFiles | None = None) -> DeploymentUpdater:
    """Build the updater from `[deploy]` (and `[mqtt]`'s TLS identity), add its blocks to the agent's
    status, subscribe to this device's deployment topic (renewed on every reconnect, so the retained
    message comes again) and start its thread. Call before the link connects."""
    policy = download_policy(deploy, mqtt)
    updater = DeploymentUpdater(agent, bundles_dir=bundles_dir, state_dir=deploy.state_path(),
                                max_bundle_bytes=deploy.max_bundle_bytes, keep=deploy.keep, policy=policy)
    agent.status_sources.update(deployment=updater.status, deployment_messages=updater.message_counts,
                                bundle_sha256=updater.bundle_sha256)
    link.subscribe(deployment_topic(agent.fleet, agent.device_id), updater.on_message, qos=1)
    updater.start()
    return updater


class Stopped(Exception):
    """The agent is stopping: leave everything as it is (a `.part` resumes at the next start)."""


class DeploymentUpdater:
    def __init__(self, agent: Agent, *, bundles_dir: Path, state_dir: Path, max_bundle_bytes: int,
                 keep: int = 2, policy: DownloadPolicy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.agent = agent
        self.bundles_dir = Path(bundles_dir)
        self.state_dir = Path(state_dir)
        self.staging = self.state_dir / "staging"
        self.kept = self.state_dir / "kept"
        self.max_bundle_bytes = max_bundle_bytes
        self.keep = max(1, keep)
        self.policy = policy or DownloadPolicy(give_up_after=600.0)
        self._clock = clock
        for folder in (self.staging, self.kept):
            folder.mkdir(parents=True, exist_ok=True)
        self.report: DeploymentReport | None = None
        self._finished: dict[str, str] = {}  # "<deployment>|<action>|<sha256>" -> final step
        self._previous: str | None = None  # the bundle serving when a swap began (see `_journal`)
        self.received = 0
        self.invalid: dict[str, int] = {}
        self.last_invalid: str | None = None
        self._load_state()
        self._lock = threading.Lock()
        self._pending: DeploymentMessage | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._job_stop = threading.Event()  # stops the download in progress: the updater stops, or a clear
        self._thread: threading.Thread | None = None
        self._last_progress = 0.0
        self._sha_cache: tuple[str, int, int, str] | None = None

    # -- messages in --------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT handler (network thread): parse and hand over; never blocks on I/O."""
        if not payload:
            # The fleet cleared this device's topic (a halted rollout): a download in progress stops
            # and is not installed; a message not yet acted on is dropped.
            with self._lock:
                self._pending = None
                self._job_stop.set()
            return
        self.received += 1
        try:
            message = parse_deployment_message(payload)
        except PayloadError as exc:
            self.invalid[exc.kind] = self.invalid.get(exc.kind, 0) + 1
            self.last_invalid = str(exc)[:MAX_REASON_CHARS]
            log.warning("ignoring a deployment message on %s: %s", topic, exc)
            self.agent.publish_status()
            return
        with self._lock:
            self._pending = message
        self._wake.set()

    # -- the worker ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deployment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._job_stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        retry: DeploymentMessage | None = None
        while not self._stop.is_set():
            self._wake.wait(RETRY_AFTER_TRANSIENT_S if retry is not None else None)
            self._wake.clear()
            with self._lock:
                message, self._pending = self._pending, None
            message = message or retry  # a newer message replaces one waiting for its retry
            if message is None or self._stop.is_set():
                continue
            retry = None
            try:
                self.handle(message)
            except Stopped:
                return
            except _Transient:
                retry = message
            except Exception:  # the updater thread must survive anything one message does
                log.exception("deployment %s failed unexpectedly", message.deployment)

    # -- acting on one message ----------------------------------------------------------------------

    def handle(self, message: DeploymentMessage) -> DeploymentReport | None:
        """Act on `message` (synchronously); the final report, or None when it was already finished.

        Raises `_Transient` after a download that gave up (to be tried again) and `Stopped` when
        the updater is stopping."""
        key = f"{message.deployment}|{message.action}|{message.sha256}"
        if self._previous is not None:  # killed between a swap and keeping what served before it
            self._keep(Path(self._previous))
        if key in self._finished:
            return None
        report = self._install(message) if message.action == INSTALL else self._rollback(message)
        self._finished[key] = report.step
        while len(self._finished) > MAX_FINISHED:
            self._finished.pop(next(iter(self._finished)))
        self._save_state()
        return report

    def _install(self, message: DeploymentMessage) -> DeploymentReport:
        if self.serving_sha256() == message.sha256:
            return self._step(message, INSTALLED, bytes_=message.size or 0)
        assert message.url is not None and message.size is not None  # the parser requires both for install
        have = _size_of(part_path(self.staging, message.sha256))
        with self._lock:
            self._job_stop = threading.Event()
            if self._stop.is_set():
                raise Stopped
        self._step(message, DOWNLOADING, bytes_=have)
        try:
            staged = download(
                message.url, sha256=message.sha256, size=message.size, staging=self.staging,
                device_id=self.agent.device_id, max_bytes=self.max_bundle_bytes, policy=self.policy,
                stop=self._job_stop, on_progress=lambda n: self._progress(message, n))
        except DownloadFailed as exc:
            if self._stop.is_set():
                raise Stopped from None
            if self._job_stop.is_set():
                return self._step(message, FAILED, reason="cancelled: the fleet cleared this deployment (halted)",
                                  bytes_=_size_of(part_path(self.staging, message.sha256)))
            report = self._step(message, FAILED, reason=f"download: {exc}",
                                bytes_=_size_of(part_path(self.staging, message.sha256)))
            if not exc.permanent:
                raise _Transient(report) from None
            return report
        self._step(message, VERIFYING, bytes_=message.size)
        target = self.bundles_dir / bundle_filename(message.name, message.version)
        previous = self._journal(self.agent.model.path)
        try:
            self._verify(staged, message, check=self.agent.selection.check_update)
            placed = self._place(staged, target)
            self.agent.update(target)
        except EdgeKitError as exc:
            self._discard(target)
            self._previous = None  # it still serves: nothing to keep
            return self._step(message, FAILED, reason=str(exc), bytes_=message.size)
        self._keep(previous)
        staged.unlink(missing_ok=True)
        log.info("deployment %s: installed %s %s (%s)", message.deployment, message.name, message.version,
                 "new file" if placed else "already in the folder")
        return self._step(message, INSTALLED, bytes_=message.size)

    def _rollback(self, message: DeploymentMessage) -> DeploymentReport:
        if self.serving_sha256() == message.sha256:
            return self._step(message, ROLLED_BACK)
        kept = self.kept / f"{message.sha256}{KEPT_SUFFIX}"
        if not kept.is_file() or file_sha256(kept) != message.sha256:
            return self._step(message, FAILED, reason=f"no kept bundle with sha256 {message.sha256[:16]}... "
                                                      "to return to (only bundles this device served are kept)")
        self._step(message, VERIFYING)
        target = self.bundles_dir / bundle_filename(message.name, message.version)
        previous = self._journal(self.agent.model.path)
        try:
            self._verify(kept, message, check=self.agent.selection.check_rollback)
            self._place(kept, target)
            self.agent.rollback_to(target)
        except EdgeKitError as exc:
            self._discard(target)
            self._previous = None  # it still serves: nothing to keep
            return self._step(message, FAILED, reason=str(exc))
        self._keep(previous)
        log.info("deployment %s: rolled back to %s %s", message.deployment, message.name, message.version)
        return self._step(message, ROLLED_BACK)

    def _verify(self, path: Path, message: DeploymentMessage,
                check: Callable[[Any, Any, str | Path], None]) -> None:
        """Signature, manifest and every hash against the agent's key; the bundle must be what the
        message says, and the selection rule (product, no-downgrade or rollback) must allow it."""
        selection = self.agent.selection
        bundle = read_bundle(path, public_key=selection.public_key, require_signature=selection.require_signature)
        if (bundle.name, bundle.version) != (message.name, message.version):
            raise VerificationError("manifest.json", f"bundle is {bundle.name} {bundle.version}, the deployment "
                                                     f"names {message.name} {message.version}")
        check(self.agent.model.runtime.info, bundle, path)

    def _place(self, source: Path, target: Path) -> bool:
        """Copy `source` into the bundles folder as `target`, atomically (a temp name the watcher
        ignores, fsync, rename); False when an identical file is already there."""
        if target.is_file() and file_sha256(target) == file_sha256(source):
            return False
        with atomic_file(target, mode=0o644) as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        return True

    def _discard(self, target: Path) -> None:
        """A refused bundle leaves the bundles folder (unless it is, somehow, the one serving)."""
        if target.exists() and target.resolve() != self.agent.model.path.resolve():
            target.unlink(missing_ok=True)

    def _journal(self, previous: Path) -> Path:
        """Write down which bundle serves before a swap: if the process dies after the swap but before
        `_keep`, the next message handled still moves it to `kept/` (the folder would otherwise hold
        both, and a rollback would find nothing kept)."""
        self._previous = str(previous)
        self._save_state()
        return previous

    def _keep(self, previous: Path) -> None:
        """Move the bundle that served until the swap out of the bundles folder into `kept/` (newest
        `keep` of them stay). Out of the folder, so a restart serves the new one: after a rollback
        the newer version must not win the start-up order again. Only bundles that served are kept,
        so a rollback can only return to one of them."""
        self._previous = None
        self._save_state()
        if not previous.is_file() or previous.resolve() == self.agent.model.path.resolve():
            return
        sha = file_sha256(previous)
        dest = self.kept / f"{sha}{KEPT_SUFFIX}"
        os.replace(previous, dest)
        os.utime(dest)  # the pruning below goes by when a bundle stopped serving
        log.info("kept %s as %s to return to", previous.name, sha[:12])
        kept = sorted(self.kept.glob(f"*{KEPT_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in kept[self.keep:]:
            old.unlink(missing_ok=True)

    # -- reports ------------------------------------------------------------------------------------

    def _step(self, message: DeploymentMessage, step: str, *, reason: str | None = None,
              bytes_: int = 0) -> DeploymentReport:
        if reason is not None:
            log.error("deployment %s (%s %s): %s", message.deployment, message.name, message.version, reason)
        self.report = DeploymentReport(
            deployment=message.deployment, version=message.version, sha256=message.sha256, step=step,
            reason=None if reason is None else reason[:MAX_REASON_CHARS], bytes=bytes_, at=self._clock())
        self._save_state()
        self.agent.publish_status()
        return self.report

    def _progress(self, message: DeploymentMessage, have: int) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self.report = DeploymentReport(message.deployment, message.version, message.sha256, DOWNLOADING,
                                           None, have, self._clock())
            self.agent.publish_status()

    def status(self) -> dict[str, Any] | None:
        """The `deployment` block of the agent's status."""
        report = self.report
        return None if report is None else report.to_dict()

    def message_counts(self) -> dict[str, Any]:
        return {"received": self.received, "invalid": dict(self.invalid), "last_invalid": self.last_invalid}

    def bundle_sha256(self) -> str | None:
        """For the status: the serving bundle file's sha256, None if the file is gone from disk."""
        try:
            return self.serving_sha256()
        except OSError:
            return None

    def serving_sha256(self) -> str:
        """sha256 of the bundle file serving now (what deployment messages name), cached per file."""
        path = self.agent.model.path
        st = path.stat()
        cache = self._sha_cache
        if cache is None or cache[:3] != (str(path), st.st_mtime_ns, st.st_size):
            self._sha_cache = cache = (str(path), st.st_mtime_ns, st.st_size, file_sha256(path))
        return cache[3]

    # -- state on disk ------------------------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.state_dir / STATE_FILE
        try:
            doc = json.loads(path.read_text())
            self._finished = {str(k): str(v) for k, v in dict(doc.get("finished", {})).items()}
            self._previous = str(doc["previous"]) if doc.get("previous") else None
            if doc.get("report"):
                self.report = parse_deployment_report(doc["report"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Losing this only means a finished deployment's retained message is checked once more.
            log.warning("ignoring unreadable %s: %s", path, exc)

    def _save_state(self) -> None:
        doc = {"report": self.report.to_dict() if self.report else None, "finished": self._finished,
               "previous": self._previous}
        atomic_write_bytes(self.state_dir / STATE_FILE, json.dumps(doc, indent=1).encode())


class _Transient(Exception):
    """A download gave up for now; the worker tries the same message again later."""


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0

