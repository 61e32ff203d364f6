"""Alerts: stored, shown, exported, and optionally turned into a retraining run.

Life of an alert: created `pending_approval` (approval mode "manual", the default: an operator
approves it in the dashboard or with `POST /api/alerts/<id>/approve`) or approved at once ("auto").
Approval runs the configured retraining command (`edge-kit build --config ...`, `dvc repro`, ...),
at most once per `retrain_min_interval_seconds` across all alerts; a trigger inside that interval
is recorded as `rate_limited` and the alert waits for another approval. Every trigger is stored
with its outcome (`succeeded`, `failed`, `timeout`, `rate_limited`, `no_command`), exit code and
the tail of its output. The command gets EDGEKIT_ALERT_ID, EDGEKIT_MODEL_SHA256 and
EDGEKIT_ALERT_SCOPE in its environment.

What one device can do: automatic approval runs the command for fleet-scoped alerts only (a fleet
alert needs the support of more than one device, `drift.py`, `concept.py`); an alert about one
device waits for an operator. An alert records its `support`, the devices whose data carry it; a
dismissed alert silences its condition only while no other device supports it, so dismissing an
alert one device raised does not hide a later one that others raise.

Approval also calls the `on_approved` hooks with the alert (`fleet serve` adds one that asks every
device the alert names, `devices_named`, for more captured samples when `[captures] request_on_alert`
is set); a failing hook is logged and changes nothing about the approval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edge_kit.errors import AlertError as AlertError  # re-exported: server.py imports it from here
from edge_kit.fleet.settings import AlertSettings
from edge_kit.fleet.storage import Storage

log = logging.getLogger(__name__)
OUTPUT_TAIL = 4000


class AlertManager:
    def __init__(self, storage: Storage, settings: AlertSettings, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Called with the alert (as `storage.alert` gives it) once it is approved, by hand or automatically.
        self.on_approved: list[Callable[[dict[str, Any]], None]] = []

    def raise_alert(self, model_sha256: str, scope: str, kind: str, summary: str,
                    detail: dict[str, Any], support: Sequence[str] | None = None) -> tuple[int, bool]:
        """Store an alert unless one stands for the same condition; returns (id, created).

        `support`: the devices whose data carry the condition (stored in the detail).
        """
        existing = self.storage.open_alert(model_sha256, scope, kind)
        if existing is not None and not _newly_supported(existing, support):
            return int(existing["id"]), False
        if support is not None:
            detail = {**detail, "support": sorted(set(support))}
        auto = self.settings.approval == "auto" and scope == "fleet"
        alert_id = self.storage.create_alert(model_sha256, scope, kind, "approved" if auto else "pending_approval",
                                             summary, detail)
        log.warning("alert %d: %s", alert_id, summary)
        if auto:
            self._trigger(alert_id, model_sha256, scope)
            self._approved(alert_id)
        return alert_id, True

    def approve(self, alert_id: int, by: str = "operator") -> dict[str, Any]:
        with self._lock:
            alert = self.storage.alert(alert_id)
            if alert is None:
                raise AlertError(404, f"no alert {alert_id}")
            if alert["state"] not in ("pending_approval", "rate_limited"):
                raise AlertError(409, f"alert {alert_id} is {alert['state']}, not waiting for approval")
            self.storage.set_alert_state(alert_id, "approved", approved_by=by)
        self._trigger(alert_id, str(alert["model_sha256"]), str(alert["scope"]))
        self._approved(alert_id)
        found = self.storage.alert(alert_id)
        assert found is not None
        return found

    def _approved(self, alert_id: int) -> None:
        if not self.on_approved:
            return
        alert = self.storage.alert(alert_id)
        if alert is None:
            return
        for hook in self.on_approved:
            try:
                hook(alert)
            except Exception:  # a hook (a capture request) must not undo or fail the approval
                log.exception("alert %d: an approval hook failed", alert_id)

    def dismiss(self, alert_id: int) -> dict[str, Any]:
        alert = self.storage.alert(alert_id)
        if alert is None:
            raise AlertError(404, f"no alert {alert_id}")
        if alert["state"] == "retraining":
            raise AlertError(409, f"alert {alert_id} is retraining; wait for the outcome")
        self.storage.set_alert_state(alert_id, "dismissed")
        found = self.storage.alert(alert_id)
        assert found is not None
        return found

    def _trigger(self, alert_id: int, model_sha256: str, scope: str) -> None:
        command = list(self.settings.retrain_command)
        with self._lock:
            if not command:
                self.storage.add_trigger(alert_id, [], "no_command", finished=True,
                                         output="no alerts.retrain_command configured")
                self.storage.set_alert_state(alert_id, "approved")
                return
            last = self.storage.last_run_trigger_at()
            now = self.clock()
            if last is not None and now - last < self.settings.retrain_min_interval_seconds:
                wait = self.settings.retrain_min_interval_seconds - (now - last)
                note = f"a retraining ran {now - last:.0f} s ago; next allowed in {wait:.0f} s"
                self.storage.add_trigger(alert_id, command, "rate_limited", finished=True, output=note, at=now)
                self.storage.set_alert_state(alert_id, "rate_limited")
                return
            trigger_id = self.storage.add_trigger(alert_id, command, "running", at=now)
            self.storage.set_alert_state(alert_id, "retraining")
        env = dict(os.environ, EDGEKIT_ALERT_ID=str(alert_id), EDGEKIT_MODEL_SHA256=model_sha256,
                   EDGEKIT_ALERT_SCOPE=scope)
        thread = threading.Thread(target=self._run, args=(alert_id, trigger_id, command, env),
                                  name=f"retrain-{alert_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, alert_id: int, trigger_id: int, command: list[str], env: dict[str, str]) -> None:
        outcome, code, output = run_command(command, env, self.settings.retrain_timeout_seconds)
        self.storage.finish_trigger(trigger_id, outcome, code, output)
        self.storage.set_alert_state(alert_id, "retrained" if outcome == "succeeded" else "retrain_failed")
        log.warning("alert %d: retraining %s (exit %s)", alert_id, outcome, code)

    def wait(self, timeout: float = 30.0) -> None:
        """Wait for running retraining commands (tests, shutdown)."""
        for t in list(self._threads):
            t.join(timeout)


def devices_named(alert: dict[str, Any]) -> list[str]:
    """The devices an alert is about: its device (device scope) or the devices supporting it (fleet scope)."""
    detail = alert.get("detail") or {}
    named = [detail["device"]] if isinstance(detail.get("device"), str) else []
    support = detail.get("support")
    if isinstance(support, list):
        named += [d for d in support if isinstance(d, str)]
    scope = str(alert.get("scope") or "")
    if scope.startswith("device:"):
        named.append(scope.removeprefix("device:"))
    return sorted(set(named))


def _newly_supported(existing: dict[str, Any], support: Sequence[str] | None) -> bool:
    """Whether a dismissed alert's condition is raised again by devices that did not carry it then."""
    if existing.get("state") != "dismissed" or not support:
        return False
    before = (existing.get("detail") or {}).get("support")
    if not isinstance(before, list):  # dismissed before support was recorded: it keeps standing
        return False
    return bool(set(support) - set(map(str, before)))


def run_command(command: list[str], env: dict[str, str], timeout: float) -> tuple[str, int | None, str]:
    """Run the retraining command; returns (outcome, exit code, output tail).

    It runs in a session of its own, and a timeout kills that whole process group: a build or
    `dvc repro` starts children (compilers, data loaders) that would otherwise outlive the kill
    of their parent and keep running, holding files and CPU, long after the trigger says "timeout".
    """
    try:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
    except OSError as exc:  # command not found, not executable
        return "failed", None, f"could not start {command[0]!r}: {exc}"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipe
            proc.kill()
            out = ""
        return "timeout", None, f"killed after {timeout} s (process group {proc.pid}):\n{out or ''}"[-OUTPUT_TAIL:]
    outcome = "succeeded" if proc.returncode == 0 else "failed"
    return outcome, proc.returncode, (out or "")[-OUTPUT_TAIL:]


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, signal.SIGKILL)
