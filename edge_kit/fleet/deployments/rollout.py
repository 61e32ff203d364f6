"""The rollout state machine, kept in the fleet database so a restarted `fleet serve` carries on.

    canary --(canary passes, auto-promote or operator)--> rolling --(every target installed)--> done
    canary --(canary fails)--> rolled_back   (the canaries are told to return to their previous bundle;
                                              an alert names the failing figure)
    canary | rolling --(operator halt)--> halted   (devices not yet told, or still downloading, are not
                                                    told anything more; those that installed keep it)
    any but rolled_back --(operator rollback)--> rolled_back   (every device told to install is told
                                                                to return to the bundle it served before)

Each change is written to the database first, then published: the retained per-device messages are
derived from the database (`messages`), so a publish that is lost (broker down, server killed in
between) is repeated on the next connect. `tick()` (every `interval` seconds) reads the devices'
reported steps, evaluates the canary and moves the state on.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from device_agent.deploy.message import (
    FAILED,
    INSTALL,
    INSTALLED,
    ROLLBACK,
    DeploymentMessage,
    encode_deployment_message,
    parse_deployment_report,
)
from device_agent.errors import PayloadError
from device_agent.uplink.wire import deployment_topic, topic_level_problem
from edge_kit.fleet.alerts import AlertManager
from edge_kit.fleet.deployments import canary as canary_mod
from edge_kit.fleet.deployments.bundles import (
    SHA256,
    BundleError,
    BundleFiles,
    DownloadLimits,
    DownloadSlots,
    StoredBundle,
)
from edge_kit.fleet.deployments.publisher import DeploymentPublisher
from edge_kit.fleet.deployments.store import (
    ACTIVE,
    CANARY,
    CANARY_ROLE,
    DONE,
    HALTED,
    REST_ROLE,
    ROLLED_BACK,
    ROLLING,
    DeploymentStore,
    Previous,
)
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.settings import FleetSettings
from edge_kit.fleet.storage import Storage

log = logging.getLogger(__name__)
CLEAR = "clear"  # the action of an empty retained payload: the device's topic holds nothing
STEPS_AFTER_STOP_SECONDS = 3600.0


@dataclass(frozen=True)
class BundleSource:
    """What a deployment installs: a bundle the fleet serves, or one on an https:// URL (CDN)."""

    sha256: str
    size: int
    name: str
    version: str
    model_sha256: str | None
    url: str | None  # None: served by this fleet at /api/bundles/<sha256>
    source: str  # "upload", "path" or "url"

    @classmethod
    def stored(cls, b: StoredBundle, source: str) -> BundleSource:
        return cls(b.sha256, b.size, b.name, b.version, b.model_sha256, None, source)


class RolloutManager:
    def __init__(self, storage: Storage, settings: FleetSettings, references: ReferenceStore, files: BundleFiles,
                 alerts: AlertManager, fleet: str, public_url: str, publisher: DeploymentPublisher | None = None,
                 thresholds: canary_mod.CanaryThresholds | None = None, interval: float = 2.0,
                 download_limits: DownloadLimits | None = None) -> None:
        self.storage = storage
        self.store = DeploymentStore(storage)
        self.settings = settings
        self.references = references
        self.files = files
        self.alerts = alerts
        self.fleet = fleet
        self.public_url = public_url.rstrip("/")
        self.publisher = publisher
        self.thresholds = thresholds or canary_mod.CanaryThresholds()
        self.interval = interval
        self.download_limits = download_limits or DownloadLimits()
        self.download_slots = DownloadSlots(self.download_limits.concurrency)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- operator actions --------------------------------------------------------------------

    def create(self, bundle: BundleSource, devices: Sequence[str] | None, canary: int, canary_windows: int,
               auto_promote: bool, seed: int | None = None) -> dict[str, Any]:
        known = {d["device"]: d for d in self.storage.devices() if d["fleet"] == self.fleet}
        targets = sorted(set(devices)) if devices else sorted(known)
        if not targets:
            raise BundleError(400, "no target devices: the fleet has seen none yet, and none were named")
        for d in targets:
            problem = topic_level_problem(d)
            if problem is not None or len(d) > 128:
                raise BundleError(400, f"device {d!r}: {problem or 'longer than 128 characters'}")
        if not 1 <= canary <= len(targets):
            raise BundleError(400, f"canary must be 1 to {len(targets)} (the target devices), got {canary}")
        if not 1 <= canary_windows <= 10_000:
            raise BundleError(400, f"canary_windows must be 1 to 10000, got {canary_windows}")
        try:  # what every agent would refuse is refused here, before anything is stored or published
            encode_deployment_message(DeploymentMessage("check", INSTALL, bundle.name, bundle.version, bundle.sha256,
                                                        bundle.size, bundle.url or f"{self.public_url}/", 0.0))
        except PayloadError as exc:
            raise BundleError(400, f"the devices would refuse this deployment: {exc}") from exc
        seed = secrets.randbits(31) if seed is None else int(seed)
        canaries = set(random.Random(seed).sample(targets, canary))
        with self._lock:
            busy = self._devices_in_active()
            clash = sorted(set(targets) & set(busy))
            if clash:
                raise BundleError(409, f"device {clash[0]} is already in active deployment {busy[clash[0]]}: "
                                       "halt or finish that one first")
            dep_id = f"d{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
            rows = [(d, CANARY_ROLE if d in canaries else REST_ROLE, self._previous(known.get(d))) for d in targets]
            self.store.create({"id": dep_id, "fleet": self.fleet, "state": CANARY, "name": bundle.name,
                               "version": bundle.version, "bundle_sha256": bundle.sha256,
                               "model_sha256": bundle.model_sha256, "size": bundle.size, "url": bundle.url,
                               "source": bundle.source, "canary_n": canary, "canary_windows": canary_windows,
                               "auto_promote": auto_promote, "seed": seed}, rows)
            self._tell(dep_id, sorted(canaries), INSTALL)
        log.info("deployment %s: %s %s to %d device(s), canaries %s", dep_id, bundle.name, bundle.version,
                 len(targets), ", ".join(sorted(canaries)))
        return self.view(dep_id)

    def _previous(self, device: dict[str, Any] | None) -> Previous:
        """The bundle a device serves now, where a rollback returns it: the file sha256 its status reports,
        else the bundle in the fleet's folder that holds the model its last window named."""
        model, version = serving_model(device)
        status = (device or {}).get("status") or {}
        name = (status.get("model") or {}).get("name") if isinstance(status.get("model"), dict) else None
        sha = status.get("bundle_sha256")
        if isinstance(sha, str) and SHA256.fullmatch(sha) and isinstance(name, str) and version:
            return Previous(sha, name, version, model)
        stored = self.files.by_model(model) if model else None
        if stored is None:
            return Previous(None, None, None, model)
        return Previous(stored.sha256, stored.name, stored.version, model)

    def promote(self, dep_id: str, note: str = "promoted by the operator") -> dict[str, Any]:
        with self._lock:
            dep = self._get(dep_id)
            if dep["state"] != CANARY:
                raise BundleError(409, f"deployment {dep_id} is {dep['state']}: only a canary can be promoted")
            self.store.set_state(dep_id, ROLLING, note=note, only_from=[CANARY])
            rest = [r["device"] for r in self.store.devices(dep_id) if r["action"] is None]
            self._tell(dep_id, rest, INSTALL)
        return self.view(dep_id)

    def halt(self, dep_id: str, note: str = "halted by the operator") -> dict[str, Any]:
        with self._lock:
            dep = self._get(dep_id)
            if dep["state"] not in ACTIVE:
                raise BundleError(409, f"deployment {dep_id} is {dep['state']}: only canary or rolling can halt")
            self.store.set_state(dep_id, HALTED, note=note, only_from=list(ACTIVE))
            # Devices that have not installed yet get nothing more: their topic is cleared.
            pending = [r["device"] for r in self.store.devices(dep_id)
                       if r["action"] == INSTALL and r["step"] not in (INSTALLED, FAILED)]
            self._tell(dep_id, pending, CLEAR)
        return self.view(dep_id)

    def rollback(self, dep_id: str, note: str = "rolled back by the operator",
                 decision: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            dep = self._get(dep_id)
            if dep["state"] == ROLLED_BACK:
                raise BundleError(409, f"deployment {dep_id} is already rolled back")
            self.store.set_state(dep_id, ROLLED_BACK, note=note, decision=decision)
            told = [r for r in self.store.devices(dep_id) if r["action"] == INSTALL]
            back = [r["device"] for r in told if r["previous_sha256"]]
            self._tell(dep_id, back, ROLLBACK)
            # No bundle known to return to (the device served nothing the fleet holds): stop the install.
            self._tell(dep_id, [r["device"] for r in told if not r["previous_sha256"]], CLEAR)
        return self.view(dep_id)

    # -- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # keep rolling out: a failed round is logged and retried
                log.exception("rollout round failed")

    def tick(self, now: float | None = None) -> None:
        """Record the devices' reported steps; decide canaries; mark finished rollouts done."""
        # Deployments halted or rolled back within the hour still record their devices' steps (the
        # rollbacks' `rolled_back`); their state no longer moves.
        recent = time.time() - STEPS_AFTER_STOP_SECONDS
        active = self.store.all(ACTIVE) + [d for d in self.store.all([HALTED, ROLLED_BACK])
                                           if float(d["updated_at"]) >= recent]
        if not active:
            return
        known = {d["device"]: d for d in self.storage.devices()}
        for dep in active:
            with self._lock:
                try:
                    self._advance(dep, known, now)
                except Exception:  # one deployment's failure must not stop the others
                    log.exception("deployment %s: round failed", dep["id"])

    def _advance(self, dep: dict[str, Any], known: dict[str, dict[str, Any]], now: float | None) -> None:
        rows = self.store.devices(dep["id"])
        steps = []
        for r in rows:
            report = ((known.get(r["device"]) or {}).get("status") or {}).get("deployment")
            if not isinstance(report, dict) or report.get("deployment") != dep["id"]:
                continue
            try:
                rep = parse_deployment_report(report)
            except PayloadError:
                continue
            if (rep.step, rep.reason, rep.bytes, rep.at) != (r["step"], r["reason"], r["bytes"], r["step_at"]):
                steps.append((r["device"], rep.step, rep.reason, rep.bytes, rep.at))
                r.update(step=rep.step, reason=rep.reason, bytes=rep.bytes, step_at=rep.at)
        if steps:
            self.store.set_steps(dep["id"], steps)
        if dep["state"] == CANARY:
            if dep["decision"] and dep["decision"].get("ready"):
                return  # decided and passed: waits for the operator (failures left this state already)
            decision = self._evaluate(dep, rows, known, now)
            self.store.set_decision(dep["id"], decision)
            if not decision["ready"]:
                return
            if not decision["passed"]:
                self._fail(dep, decision)
            elif dep["auto_promote"]:
                self.promote(dep["id"], note="promoted automatically: the canary passed")
        elif dep["state"] == ROLLING and all(self._serves(r, dep, known) for r in rows):
            self.store.set_state(dep["id"], DONE, note="every target device installed the bundle",
                                 only_from=[ROLLING])
            log.info("deployment %s done", dep["id"])

    @staticmethod
    def _serves(row: dict[str, Any], dep: dict[str, Any], known: dict[str, dict[str, Any]]) -> bool:
        model = serving_model(known.get(row["device"]))[0]
        return row["step"] == INSTALLED or (dep["model_sha256"] is not None and model == dep["model_sha256"])

    def _evaluate(self, dep: dict[str, Any], rows: list[dict[str, Any]], known: dict[str, dict[str, Any]],
                  now: float | None) -> dict[str, Any]:
        new = self.references.get(dep["model_sha256"]) if dep["model_sha256"] else None
        control_refs = {}
        for r in rows:
            model = serving_model(known.get(r["device"]))[0]
            if r["role"] == REST_ROLE and model and model != dep["model_sha256"]:
                ref = self.references.get(model)
                if ref is not None:
                    control_refs[r["device"]] = ref
        canaries = [r["device"] for r in rows if r["role"] == CANARY_ROLE]
        before = {r["device"]: ref for r in rows if r["role"] == CANARY_ROLE and r["previous_model_sha256"]
                  and (ref := self.references.get(r["previous_model_sha256"])) is not None}
        statuses = {d: (k.get("status") or {}) for d, k in known.items()}
        return canary_mod.evaluate(
            self.storage, self.settings, new=new, created_at=float(dep["created_at"]), canary=canaries,
            canary_steps={r["device"]: (r["step"], r["reason"]) for r in rows if r["role"] == CANARY_ROLE},
            control=canary_mod.Side(sorted(control_refs), control_refs), canary_before=before, statuses=statuses,
            windows=int(dep["canary_windows"]), thresholds=self.thresholds, now=now)

    def _fail(self, dep: dict[str, Any], decision: dict[str, Any]) -> None:
        figures = decision["figures"]
        said = "; ".join(f"{name}: {_figure_words(name, figures[name])}" for name in decision["failing"])
        note = f"canary failed ({said}); canaries rolled back"
        self.rollback(dep["id"], note=note, decision=decision)
        self.alerts.raise_alert(dep["model_sha256"] or dep["bundle_sha256"], f"deployment:{dep['id']}",
                                "canary_failed", f"{dep['name']} {dep['version']}: deployment {dep['id']} {note}",
                                {"deployment": dep["id"], "failing": decision["failing"],
                                 "figures": {k: figures[k] for k in decision["failing"]}})
        log.warning("deployment %s: %s", dep["id"], note)

    # -- what is published -------------------------------------------------------------------

    def _tell(self, dep_id: str, devices: Sequence[str], action: str) -> None:
        if not devices:
            return
        self.store.set_action(dep_id, devices, action)
        if self.publisher is not None:
            wanted = set(devices)
            self.publisher.publish([m for d, m in self._messages(dep_id) if d in wanted])

    def _messages(self, only: str | None = None) -> list[tuple[str, tuple[str, bytes]]]:
        """(device, (topic, payload)) of every device whose latest published action is `only`'s (or any)."""
        deps: dict[str, dict[str, Any]] = {}
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        out = []
        for device, dep_id, action, at in self.store.published(self.fleet):
            if only is not None and dep_id != only:
                continue
            if dep_id not in deps:
                deps[dep_id] = self._get(dep_id)
                rows.update({(dep_id, r["device"]): r for r in self.store.devices(dep_id)})
            payload = self._payload(deps[dep_id], rows[(dep_id, device)], action, at)
            out.append((device, (deployment_topic(self.fleet, device), payload)))
        return out

    def messages(self) -> list[tuple[str, bytes]]:
        """Every retained message the broker must hold for this fleet (republished on each connect)."""
        return [m for _, m in self._messages()]

    def _payload(self, dep: dict[str, Any], row: dict[str, Any], action: str, at: float) -> bytes:
        if action == CLEAR:
            return b""
        if action == ROLLBACK:
            msg = DeploymentMessage(deployment=dep["id"], action=ROLLBACK, name=row["previous_name"],
                                    version=row["previous_version"], sha256=row["previous_sha256"], size=None,
                                    url=None, issued_at=round(at, 3))
        else:
            msg = DeploymentMessage(deployment=dep["id"], action=INSTALL, name=dep["name"], version=dep["version"],
                                    sha256=dep["bundle_sha256"], size=int(dep["size"]),
                                    url=dep["url"] or f"{self.public_url}/api/bundles/{dep['bundle_sha256']}",
                                    issued_at=round(at, 3))
        return encode_deployment_message(msg)

    # -- reading -----------------------------------------------------------------------------

    def _get(self, dep_id: str) -> dict[str, Any]:
        dep = self.store.get(dep_id)
        if dep is None:
            raise BundleError(404, f"no deployment {dep_id!r}")
        return dep

    def _devices_in_active(self) -> dict[str, str]:
        out = {}
        for dep in self.store.all(ACTIVE):
            out.update({r["device"]: dep["id"] for r in self.store.devices(dep["id"])})
        return out

    def view(self, dep_id: str) -> dict[str, Any]:
        """The deployment as the API, CLI (--json) and dashboard show it."""
        dep = self._get(dep_id)
        known = {d["device"]: d for d in self.storage.devices()}
        devices = {}
        for r in self.store.devices(dep_id):
            model, version = serving_model(known.get(r["device"]))
            step = r["step"] or ("told" if r["action"] == INSTALL else "waiting" if r["action"] is None
                                 else r["action"])
            devices[r["device"]] = {
                "version": version, "model_sha256": model, "state": step,
                "role": r["role"], "action": r["action"], "reason": r["reason"], "bytes": r["bytes"],
                "served_bytes": int(r["served_bytes"] or 0), "previous_version": r["previous_version"]}
        return {"deployment": dep["id"], "state": dep["state"], "version": dep["version"], "name": dep["name"],
                "sha256": dep["bundle_sha256"], "model_sha256": dep["model_sha256"], "size": dep["size"],
                "url": dep["url"] or f"{self.public_url}/api/bundles/{dep['bundle_sha256']}",
                "source": dep["source"], "created_at": dep["created_at"], "updated_at": dep["updated_at"],
                "auto_promote": dep["auto_promote"], "canary_windows": dep["canary_windows"], "seed": dep["seed"],
                "note": dep["note"], "devices": devices,
                "canary": dep["decision"] or {"ready": False, "passed": None, "figures": {}}}

    def metrics(self) -> list[str]:
        """Prometheus lines: deployments by state, bundle downloads in progress and refused."""
        states: dict[str, int] = {}
        for dep in self.store.all():
            states[dep["state"]] = states.get(dep["state"], 0) + 1
        slots = self.download_slots
        return [
            "# HELP edgekit_fleet_deployments Deployments by state.", "# TYPE edgekit_fleet_deployments gauge",
            *(f'edgekit_fleet_deployments{{state="{state}"}} {n}' for state, n in sorted(states.items())),
            "# HELP edgekit_fleet_bundle_downloads Bundle downloads in progress.",
            "# TYPE edgekit_fleet_bundle_downloads gauge", f"edgekit_fleet_bundle_downloads {slots.active}",
            "# HELP edgekit_fleet_bundle_downloads_refused_total Downloads refused by the concurrency cap (503).",
            "# TYPE edgekit_fleet_bundle_downloads_refused_total counter",
            f"edgekit_fleet_bundle_downloads_refused_total {slots.refused}",
        ]

    def list(self) -> list[dict[str, Any]]:
        return [self.view(d["id"]) for d in self.store.all()]


def serving_model(device: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(model sha256, version) a device serves: its status says so at every step change; else its last window."""
    device = device or {}
    model = (device.get("status") or {}).get("model")
    if isinstance(model, dict) and isinstance(model.get("sha256"), str):
        return model["sha256"], str(model.get("version")) if model.get("version") is not None else None
    return device.get("model_sha256"), device.get("model_version")


def _figure_words(name: str, f: dict[str, Any]) -> str:
    """One failing figure in a few words, for the alert and the deployment's note."""
    if name == "install":
        return f"{f['failed']} of {f['canaries']} canaries failed to install ({'; '.join(f['reasons'].values())[:200]})"
    if name == "requests":
        return f"failed-request share {f['canary_rate']:.3f} vs control {f['control_rate'] or 0.0:.3f}"
    if name == "latency":
        return f"p95 {f['canary_p95_ms']:.1f} ms vs control {f['control_p95_ms']:.1f} ms"
    if name == "predicted_class":
        return f"predicted classes differ from control (chi-square p = {f['p_value']:.2g}, TVD = {f['tvd']:.3f})"
    if name == "input_drift":
        return f"inputs drifted from the bundle's reference in {', '.join(f['drifted'][:5])}"
    if name == "accuracy":
        return f"labelled accuracy {f['canary_accuracy']:.3f} vs control {f['control_accuracy']:.3f}"
    return "failed"
