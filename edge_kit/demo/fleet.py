"""The whole loop on one machine: `python -m edge_kit.demo.fleet` (`make fleet-demo`).

Builds (or reuses) the signed digits bundle, starts Mosquitto, `edge-kit fleet serve` and a handful of
`edge-agent run` processes (each with its own bundles folder), and feeds each agent held-out digits over
its HTTP API. Some devices gradually receive shifted inputs (Gaussian noise, a translated image, a changed
class mix); within a few windows the dashboard shows drift on those devices only and raises alerts.
Every agent captures a sample of what it serves (`[capture]`, with the labels the feeder returns) and uploads
it to the fleet server with its own device token. Approving an alert (in the dashboard, or `--approve` when
headless) asks the flagged devices for more samples and runs the retraining chain (`edge_kit.demo.retrain`):
export their captures, `edge-kit data add` them as a new DVC snapshot, build the next version on base + field
data, and deploy it through the fleet server (one canary, then the rest once the canary passes). The summary
gives the labelled accuracy of the old and the new version on the shifted and on the clean devices.
`--bad-bundle` then deploys a bundle whose predictions skew: the canary halts it and rolls it back.

    python -m edge_kit.demo.fleet                         # interactive: prints the dashboard URL; Ctrl-C stops
    python -m edge_kit.demo.fleet --headless --duration 90 [--approve] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.format import read_bundle
from device_agent.bundle.selection import resolve_bundle
from edge_kit.demo import rollout
from edge_kit.demo.broker import Broker
from edge_kit.demo.feeder import DeviceFeeder
from edge_kit.demo.processes import ManagedProcess, free_port, http_json, wait_for_port
from edge_kit.demo.project import build_bundle, ensure_keys, write_project
from edge_kit.demo.shifts import Shift
from edge_kit.errors import EdgeKitError, UsageError
from edge_kit.fleet.device_tokens import create_device_key, device_token

log = logging.getLogger("edge_kit.demo")

EXAMPLE_CONFIG = Path("examples/digits/edgekit.toml")
MAKE_DEMO_KEYS = Path(".keys")
FLEET = "demo"
# How long a headless run may go past --duration to let an approved retraining finish and roll out.
RETRAIN_GRACE_S = 900.0
# Which shift each device gets, in order; devices past this list are clean.
SHIFT_KINDS = ("none", "noise", "none", "translate", "none", "classmix")
# Field capture on every demo device: a quarter of the rows it serves, uploaded every 2 s; an approved alert
# asks the flagged devices for CAPTURE_ON_ALERT more, and the retraining waits for RETRAIN_MIN_LABELLED each.
CAPTURE_FRACTION = 0.25
CAPTURE_ON_ALERT = 400
RETRAIN_MIN_LABELLED = 300
# Windows of labelled inputs every device serves with the retrained version before a headless run ends: enough
# for its accuracy to mean something and for the fleet to say whether the shifted devices are still flagged.
AFTER_WINDOWS = 4


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    example_config: Path = EXAMPLE_CONFIG
    # A ready bundle to start from; default: build one from the demo's project. (Not `make demo`'s: that one
    # trained on part of the demo's held-out split, which the feeders score the versions on.)
    bundle: Path | None = None
    devices: int = 6
    window_seconds: float = 4.0
    shift_after_windows: float = 2.0  # clean windows on every device before the shifts begin
    ramp_windows: float = 2.0  # windows over which a shift grows to full severity
    samples_per_window: int = 160
    batch: int = 8
    http_port: int | None = None
    headless: bool = False
    duration: float = 90.0
    approve: bool = False
    bad_bundle: bool = False  # deploy a skewed bundle after the retrained one (or half way without --approve)

    def shift_for(self, index: int) -> Shift:
        kind = SHIFT_KINDS[index] if index < len(SHIFT_KINDS) else "none"
        return Shift(kind, self.shift_after_windows * self.window_seconds, self.ramp_windows * self.window_seconds)


@dataclass
class Device:
    name: str
    shift: Shift
    port: int
    spool: Path
    process: ManagedProcess | None = None  # started once the fleet server is
    feeder: DeviceFeeder | None = None
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FleetDemo:
    def __init__(self, options: DemoOptions) -> None:
        self.o = options
        self.workdir = options.workdir.resolve()
        self.logs = self.workdir / "logs"
        self.bundles = self.workdir / "bundles"
        self.broker: Broker | None = None
        self.fleet: ManagedProcess | None = None
        self.fleet_port = options.http_port or free_port()
        self.devices: list[Device] = []
        self.started_at = 0.0
        self.retrain: dict[str, Any] = {}
        self.final_alerts: list[dict[str, Any]] = []
        self.versions: dict[str, str] = {}  # model sha256 -> version, as the fleet server knows them
        self.initial_version = ""
        self.final_deployments: list[dict[str, Any]] = []
        self.deployments: dict[str, str] = {}  # "retrained" / "skewed" -> deployment id
        self.retrained_version: str | None = None

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.fleet_port}/"

    # -- setup -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The project copy, keys and the first bundle (reused when there is one)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config = write_project(self.o.example_config.resolve(), self.workdir / "project")
        self.key, self.pubkey = ensure_keys([MAKE_DEMO_KEYS.resolve()], self.workdir / "keys")
        existing = sorted(self.bundles.glob("*.edgebundle"))
        start = self.o.bundle
        if existing:
            log.info("reusing %s", ", ".join(p.name for p in existing))
        elif start is not None:
            self.bundles.mkdir(parents=True, exist_ok=True)
            shutil.copy2(start, self.bundles / start.name)
            log.info("starting from %s", start)
        else:
            log.info("building the digits bundle (train, quantize, gate, sign): this takes a minute or two")
            result = build_bundle(self.config, self.bundles, self.key, self.logs / "build.log")
            log.info("built %s", result.get("bundle"))
        self.data = held_out_digits(self.config)
        self.initial_version = read_bundle(resolve_bundle(self.bundles)).version

    def fleet_config(self) -> Path:
        clean = {d.name for d in self.devices if d.shift.kind == "none"}
        retrain = [sys.executable, "-m", "edge_kit.demo.retrain", "--config", str(self.config),
                   "--bundles", str(self.bundles), "--key", str(self.key), "--server", self.dashboard.rstrip("/"),
                   "--min-labelled", str(RETRAIN_MIN_LABELLED),
                   "--canary-seed", str(rollout.clean_canary_seed([d.name for d in self.devices], clean))]
        path = self.workdir / "fleet.toml"
        path.write_text(
            "# Written by the fleet demo: short windows so drift shows within a minute. The practical\n"
            "# thresholds are set above what a clean device shows against the reference here (the reference\n"
            "# is the training split, on which the model is a little more confident than on held-out data):\n"
            "# clean devices measure 0.15-0.3 sd, the shifted ones 0.8-4 sd.\n"
            "[drift]\n"
            "alpha = 0.001\nmin_n = 100\nk = 2\nm = 3\n"
            "effect_wasserstein = 0.5\neffect_class_tvd = 0.15\n"
            f"fleet_window_seconds = {self.o.window_seconds}\n"
            "lookback_seconds = 3600\nevaluate_every_seconds = 2\n"
            "[alerts]\n"
            'approval = "manual"\n'
            f"retrain_command = {json.dumps(retrain)}\n"
            "retrain_min_interval_seconds = 60\nretrain_timeout_seconds = 1800\n"
            "[ingest]\noffline_after_seconds = 30\n"
            f"[captures]\nrequest_on_alert = {CAPTURE_ON_ALERT}\n"
        )
        return path

    def start(self) -> None:
        # The fleet server (a child: it inherits the environment) refuses changes without an operator token.
        os.environ.setdefault("EDGEKIT_FLEET_TOKEN", secrets.token_urlsafe(24))
        self.broker = Broker(self.workdir / "broker")
        db = self.workdir / "fleet.db"
        for stale in (db, db.with_name("fleet.db-wal"), db.with_name("fleet.db-shm")):
            stale.unlink(missing_ok=True)  # each demo run starts with an empty fleet
        captures = self.workdir / "captures"
        if captures.exists():
            shutil.rmtree(captures)  # and no captures
        # The fleet's device key: each device's upload token is derived from it (`fleet enroll` writes the same).
        device_key = create_device_key(self.workdir / "keys" / "device-token.key")
        plan = [(f"dev-{i + 1}", self.o.shift_for(i), free_port()) for i in range(self.o.devices)]
        self.devices = [Device(name, shift, port, self.workdir / "agents" / name / "spool.db")
                        for name, shift, port in plan]
        self.fleet = ManagedProcess.python("fleet", "edge_kit", [
            "fleet", "serve", "--broker", self.broker.url, "--db", f"sqlite:///{db}",
            "--http", f"127.0.0.1:{self.fleet_port}", "--fleet", FLEET, "--bundles", str(self.bundles),
            "--pubkey", str(self.pubkey), "--config", str(self.fleet_config()), "--captures", str(captures),
            "--device-key-file", str(self.workdir / "keys" / "device-token.key"), "--json"], self.logs)
        # Devices may publish only once the fleet's consumer has subscribed, or their first windows go
        # nowhere. It subscribes to summaries (shared) and statuses in one SUBSCRIBE; Mosquitto's count
        # leaves shared subscriptions out, so: this check's own $SYS subscription + the status one.
        self.broker.wait_for_subscriptions(2, timeout=60)
        for d in self.devices:
            name, port, spool = d.name, d.port, d.spool
            if spool.parent.exists():
                shutil.rmtree(spool.parent)
            spool.parent.mkdir(parents=True)
            # Each device its own bundles folder, seeded with the first bundle; later ones arrive as deployments.
            own = spool.parent / "bundles"
            own.mkdir()
            first = resolve_bundle(self.bundles)
            shutil.copy2(first, own / first.name)
            token = spool.parent / "upload.token"
            token.write_text(device_token(device_key, name))
            token.chmod(0o600)
            config = spool.parent / "agent.toml"
            config.write_text(
                f'[deploy]\nenabled = true\nstate_dir = "{spool.parent / "deploy"}"\n'
                f'[capture]\nenabled = true\nfraction = {CAPTURE_FRACTION}\nfleet_requests = true\n'
                f'upload_url = "{self.dashboard.rstrip("/")}"\ntoken_file = "{token}"\n'
                f'state_dir = "{spool.parent / "capture"}"\nupload_interval = 2.0\n')
            d.process = ManagedProcess.python(name, "device_agent", [
                "run", "--bundle", str(own), "--config", str(config), "--broker", self.broker.url, "--device-id", name,
                "--fleet", FLEET, "--spool", str(spool), "--http", f"127.0.0.1:{port}",
                "--window-seconds", str(self.o.window_seconds), "--pubkey", str(self.pubkey), "--json"], self.logs)
        wait_for_port(self.fleet_port, 60, self.fleet)
        for d in self.devices:
            assert d.process is not None
            wait_for_port(d.port, 60, d.process)
        x, y, labels = self.data
        # Two disjoint pools of held-out digits: the first is fed (and captured) until a device serves a new
        # version, the second after, so the new version is scored on images it never trained on.
        order = np.random.default_rng(7).permutation(len(y))
        pool_a, pool_b = order[: len(y) // 2], order[len(y) // 2:]
        per_second = self.o.samples_per_window / self.o.window_seconds
        for i, d in enumerate(self.devices):
            d.feeder = DeviceFeeder(d.name, d.url, x[pool_a], y[pool_a], labels, d.shift, batch=self.o.batch,
                                    interval_s=self.o.batch / per_second, seed=1000 + i,
                                    later=(x[pool_b], y[pool_b]))
        self.started_at = time.time()
        for d in self.devices:
            assert d.feeder is not None
            d.feeder.start()

    # -- while running ---------------------------------------------------------------------------

    def alerts(self) -> list[dict[str, Any]]:
        return list(http_json(f"{self.dashboard}api/alerts").get("alerts", []))

    def approve_first_alert(self) -> dict[str, Any] | None:
        for alert in sorted(self.alerts(), key=lambda a: a["id"]):
            if alert["state"] == "pending_approval":
                log.info("approving alert %s: %s", alert["id"], alert["summary"])
                answer: dict[str, Any] = http_json(f"{self.dashboard}api/alerts/{alert['id']}/approve",
                                                   {"by": "fleet-demo"})
                return answer
        return None

    def retrain_outcome(self, alert_id: int) -> dict[str, Any]:
        alert = next((a for a in self.alerts() if int(a["id"]) == alert_id), None)
        if alert is None:
            return {"state": "unknown"}
        triggers = alert.get("triggers") or []
        last = triggers[-1] if triggers else {}
        versions = {d.name: (d.feeder.stats.models if d.feeder else set()) for d in self.devices}
        return {"state": alert["state"], "outcome": last.get("outcome"), "returncode": last.get("returncode"),
                "models_served": {k: sorted(v) for k, v in versions.items()}}

    def retrain_done(self, alert_id: int) -> bool:
        """The retraining finished and (if it succeeded) its deployment finished: rolled out to every agent
        (each answered with a second model version, then served AFTER_WINDOWS windows of labelled inputs with
        it), or halted by the canary."""
        outcome = self.retrain_outcome(alert_id)
        if outcome["state"] in ("retrain_failed",):
            return True
        if outcome["state"] != "retrained":
            return False
        if "retrained" not in self.deployments:  # the retraining chain deployed it: find that deployment
            self.retrained_version = read_bundle(rollout.newest_bundle(self.bundles)).version
            found = [d for d in rollout.deployments(self.dashboard) if d["version"] == self.retrained_version]
            if not found:
                return False
            self.deployments["retrained"] = str(found[-1]["deployment"])
            log.info("retraining deployed %s as %s", self.retrained_version, self.deployments["retrained"])
            return False
        state = self.deployment_state("retrained")
        if state == "done":
            wanted = AFTER_WINDOWS * self.o.samples_per_window
            return all(len(v) > 1 for v in outcome["models_served"].values()) and all(
                d.feeder.stats.labelled.get(self.retrained_version or "", 0) >= wanted
                for d in self.devices if d.feeder is not None)
        return state in ("halted", "rolled_back")

    def deploy(self, what: str, bundle: Path) -> None:
        clean = {d.name for d in self.devices if d.shift.kind == "none"}
        seed = rollout.clean_canary_seed([d.name for d in self.devices], clean)
        answer = rollout.deploy(self.dashboard, bundle, seed)
        self.deployments[what] = str(answer["deployment"])
        canary = [d for d, v in answer["devices"].items() if v["role"] == "canary"]
        log.info("deployed %s (%s) as %s: canary %s", bundle.name, what, answer["deployment"], ", ".join(canary))

    def deployment_state(self, what: str) -> str | None:
        dep = self.deployments.get(what)
        return None if dep is None else str(rollout.deployment(self.dashboard, dep)["state"])

    def skewed_done(self) -> bool:
        """The skewed bundle was deployed, the canary decided, and a rolled-back canary said it returned
        (the bundle is made and deployed here on the first call)."""
        if "skewed" not in self.deployments:
            current = rollout.newest_bundle(self.bundles)
            version = read_bundle(current).version
            bad = rollout.skewed_bundle(current, self.bundles, self.key, f"{version}.post1")
            self.deploy("skewed", bad)
            return False
        view = rollout.deployment(self.dashboard, self.deployments["skewed"])
        if view["state"] in ("canary", "rolling"):
            return False
        # Rolled back: done once the canaries reported returning to the bundle they served before.
        told = [v for v in view["devices"].values() if v["role"] == "canary"]
        return view["state"] != "rolled_back" or all(v["state"] in ("rolled_back", "failed") for v in told)

    def check_processes(self) -> None:
        for p in [self.fleet, *(d.process for d in self.devices)]:
            if p is not None:
                p.check_alive()

    # -- teardown and summary --------------------------------------------------------------------

    def stop(self) -> None:
        """Feeders, then agents (SIGTERM: each closes and spools its open window), then the server once it
        stored what they sent, then the broker. Every process is stopped even if an earlier step fails."""
        try:
            for d in self.devices:
                if d.feeder is not None:
                    d.feeder.stop()
            for d in self.devices:
                if d.feeder is not None and d.feeder.is_alive():
                    d.feeder.join(timeout=10)
        finally:
            try:
                for d in self.devices:
                    if d.process is not None:
                        d.process.stop()
                        d.final = d.process.final_json() or {}
                if self.fleet is not None and self.fleet.running:
                    self.wait_for_ingest(timeout=20)
            finally:
                for d in self.devices:
                    if d.process is not None:
                        d.process.stop()  # a no-op for those already stopped
                if self.fleet is not None:
                    self.fleet.stop()
                if "skewed" in self.deployments:  # a next run must not start from the deliberately bad bundle
                    for path in self.bundles.glob("*.post1.edgebundle"):
                        path.unlink()
                if self.broker is not None:
                    self.broker.stop()

    def stored_windows(self) -> dict[str, int]:
        from edge_kit.fleet.storage import Storage

        storage = Storage(f"sqlite:///{self.workdir / 'fleet.db'}")
        try:
            counts: dict[str, int] = {}
            for sha in storage.models_with_windows(0.0):
                for row in storage.windows(sha, 0.0):
                    counts[str(row[0])] = counts.get(str(row[0]), 0) + 1
            return counts
        finally:
            storage.close()

    def wait_for_ingest(self, timeout: float) -> None:
        """Until the server stored every window the agents closed (or `timeout`): QoS 1 delivery takes a moment."""
        expected = {d.name: int((d.final.get("counters") or {}).get("windows_closed", 0)) for d in self.devices}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stored = self.stored_windows()
            if all(stored.get(name, 0) >= n for name, n in expected.items()):
                return
            time.sleep(0.5)

    def summary(self) -> dict[str, Any]:
        from device_agent.uplink.spool import Spool

        stored = self.stored_windows() if (self.workdir / "fleet.db").exists() else {}
        alerts = [{**a, "version": self.versions.get(str(a["model_sha256"]), "?")} for a in self.final_alerts]
        flagged_by_version: dict[str, list[str]] = {}
        for a in alerts:
            if str(a["scope"]).startswith("device:") and a["kind"] == "data_drift":
                flagged_by_version.setdefault(a["version"], []).append(str(a["scope"]).split(":", 1)[1])
        flagged_by_version = {v: sorted(set(ds)) for v, ds in sorted(flagged_by_version.items())}
        # The check is on the model the shifts started under; a retrained version is judged afresh.
        flagged = flagged_by_version.get(self.initial_version, [])
        initial_alerts = [a for a in alerts if a["version"] == self.initial_version]
        devices = []
        for d in self.devices:
            spool = Spool(d.spool)
            pending = len(spool)
            spool.close()
            closed = int((d.final.get("counters") or {}).get("windows_closed", 0))
            first_alert = min((float(a["created_at"]) for a in initial_alerts if a["scope"] == f"device:{d.name}"),
                              default=None)
            stats = d.feeder.stats if d.feeder else None
            first_shift = stats.first_shifted_at if stats else None
            detection = (first_alert - first_shift) if first_alert and first_shift else None
            devices.append({
                "device": d.name,
                "shift": d.shift.kind,
                "flagged": d.name in flagged,
                "samples": stats.samples if stats else 0,
                "request_errors": stats.errors if stats else 0,
                "models_served": sorted(stats.models) if stats else [],
                "windows_closed": closed,
                "windows_stored": stored.get(d.name, 0),
                "windows_in_spool": pending,
                "windows_lost": closed - stored.get(d.name, 0) - pending,
                "first_shifted_at": first_shift,
                "alert_at": first_alert,
                "detection_seconds": detection,
                "detection_windows": detection / self.o.window_seconds if detection is not None else None,
                # Labelled accuracy of the first and the retrained version on this device's inputs (full
                # shift severity on a shifted device; the second pool of digits for the retrained version).
                "accuracy_before": stats.accuracy(self.initial_version) if stats else None,
                "accuracy_after": stats.accuracy(self.retrained_version) if stats and self.retrained_version
                else None,
                "labelled_before": stats.labelled.get(self.initial_version, 0) if stats else 0,
                "labelled_after": stats.labelled.get(self.retrained_version or "", 0) if stats else 0,
            })
        shifted = sorted(d.name for d in self.devices if d.shift.kind != "none")
        return {
            "dashboard": self.dashboard,
            "duration_s": round(time.time() - self.started_at, 1) if self.started_at else 0.0,
            "window_seconds": self.o.window_seconds,
            "devices": devices,
            "shifted": shifted,
            "model_version": self.initial_version,
            "flagged": flagged,
            "flagged_by_version": flagged_by_version,
            "exactly_shifted_flagged": flagged == shifted,
            "windows_closed": sum(d["windows_closed"] for d in devices),
            "windows_stored": sum(d["windows_stored"] for d in devices),
            "windows_lost": sum(d["windows_lost"] for d in devices),
            "alerts": [{k: a[k] for k in ("id", "version", "scope", "kind", "state", "summary", "created_at")}
                       for a in alerts],
            "retrain": self.retrain,
            "deployments": self.deployment_summaries(),
            "retrained_version": self.retrained_version,
            "shifted_accuracy": self.pooled_accuracy(shifted=True),
            "clean_accuracy": self.pooled_accuracy(shifted=False),
            "field_data": self.field_data(),
            "still_flagged": self.still_flagged(flagged_by_version),
        }

    def pooled_accuracy(self, *, shifted: bool) -> dict[str, float | None]:
        """Labelled accuracy of the first and the retrained version, pooled over the shifted (or clean) devices."""
        out: dict[str, float | None] = {}
        for key, version in (("before", self.initial_version), ("after", self.retrained_version)):
            n = hits = 0
            for d in self.devices:
                if d.feeder is None or (d.shift.kind != "none") != shifted or version is None:
                    continue
                n += d.feeder.stats.labelled.get(version, 0)
                hits += d.feeder.stats.correct.get(version, 0)
            out[key] = round(hits / n, 4) if n else None
        return out

    def field_data(self) -> dict[str, Any]:
        """What the retraining added to the project (the last entry of data/field-manifest.json)."""
        manifest = self.config.parent / "data" / "field-manifest.json"
        if not manifest.is_file():
            return {}
        entries = json.loads(manifest.read_text()).get("entries") or []
        return dict(entries[-1]) if entries else {}

    def still_flagged(self, flagged_by_version: dict[str, list[str]]) -> dict[str, Any]:
        """Whether the shifted devices are flagged against the retrained version's reference too, and why."""
        if self.retrained_version is None:
            return {}
        flagged = flagged_by_version.get(self.retrained_version, [])
        shifted = sorted(d.name for d in self.devices if d.shift.kind != "none")
        # monitor.reference = "base": the new reference describes the data source's rows, as the old one did.
        why = ("the new version's reference histograms describe the data source's training rows only "
               "(monitor.reference = \"base\"), not the field rows it also trained on: a device whose inputs "
               "stay shifted still differs from what the model was designed for. Drift says the inputs changed; "
               "the accuracy says whether the model now copes with them.")
        missing = [d for d in self.devices if d.shift.kind != "none" and d.name not in flagged]
        if missing:
            served = ", ".join(
                f"{d.name} ({d.shift.kind}, {d.feeder.stats.labelled.get(self.retrained_version, 0) if d.feeder else 0}"
                " inputs)" for d in missing)
            why += (f" Not flagged under it in this run: {served}; an alert needs 2 flagged windows of the "
                    "last 3 on that device.")
        return {"version": self.retrained_version, "devices": flagged,
                "shifted_still_flagged": sorted(set(shifted) & set(flagged)), "why": why}

    def deployment_summaries(self) -> list[dict[str, Any]]:
        if self.fleet is None or not self.fleet.running:
            return self.final_deployments
        out = []
        for what, dep in self.deployments.items():
            view = rollout.deployment(self.dashboard, dep)
            canary = view.get("canary") or {}
            out.append({"what": what, "deployment": dep, "version": view["version"], "state": view["state"],
                        "canary_passed": canary.get("passed"), "failing": canary.get("failing", []),
                        "note": view.get("note"),
                        "devices": {d: {"version": v["version"], "state": v["state"], "role": v["role"]}
                                    for d, v in view["devices"].items()}})
        return out


def held_out_digits(config: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw held-out digits (never used for training or calibration), their labels and the class names."""
    from edge_kit.config import load_config
    from edge_kit.train.data import load_dataset

    dataset = load_dataset(load_config(config))
    # The data source's held-out rows only: field rows a retraining added (after the source's) are captures.
    end = len(dataset.y_test) - (dataset.field.test_rows if dataset.field is not None else 0)
    return (np.asarray(dataset.X_test[:end], dtype=np.float32), np.asarray(dataset.y_test[:end]),
            list(dataset.labels))


def run_demo(options: DemoOptions, stop: threading.Event | None = None) -> dict[str, Any]:
    """Run the demo until `options.duration` (headless) or `stop` is set; the summary."""
    stop = stop or threading.Event()
    demo = FleetDemo(options)
    try:
        demo.prepare()
        demo.start()
        print(f"\nDashboard: {demo.dashboard}#token={os.environ['EDGEKIT_FLEET_TOKEN']}\n"
              f"{len(demo.devices)} devices; shifted: "
              + ", ".join(f"{d.name} ({d.shift.kind})" for d in demo.devices if d.shift.kind != "none")
              + (f"; running for {options.duration:.0f} s" if options.headless else "; Ctrl-C stops"),
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + options.duration if options.headless else float("inf")
        hard_stop = deadline + RETRAIN_GRACE_S
        half_way = time.monotonic() + options.duration / 2
        approved_id: int | None = None
        retrained = skewed = False
        while not stop.wait(1.0):
            demo.check_processes()
            now = time.monotonic()
            if options.approve and approved_id is None and now < deadline:
                answer = demo.approve_first_alert()
                if answer is not None:
                    approved_id = int(answer["id"])
                    demo.retrain = {"alert": approved_id, "approved_at": time.time()}
            if approved_id is not None and not retrained:
                retrained = demo.retrain_done(approved_id)
            # The skewed bundle follows the retrained one (or comes half way through without --approve).
            if options.bad_bundle and not skewed and (retrained or (not options.approve and now >= half_way)):
                skewed = demo.skewed_done()
            finished = (approved_id is None or retrained) and (not options.bad_bundle or skewed)
            if now >= deadline and (finished or now >= hard_stop):
                break
        demo.final_alerts = demo.alerts()
        demo.final_deployments = demo.deployment_summaries()
        demo.versions = {str(m["sha256"]): str(m["version"])
                         for m in http_json(f"{demo.dashboard}api/devices").get("models", [])}
        if approved_id is not None:
            demo.retrain.update(demo.retrain_outcome(approved_id))
    finally:
        demo.stop()
    return demo.summary()


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nFleet demo: {len(s['devices'])} devices, {s['duration_s']} s, windows of {s['window_seconds']} s")
    print(f"{'device':8} {'shift':10} {'flagged':8} {'samples':>8} {'closed':>7} {'stored':>7} {'spooled':>8} "
          f"{'lost':>5} {'detected after':>15}")
    for d in s["devices"]:
        after = (f"{d['detection_seconds']:.0f} s / {d['detection_windows']:.1f} w"
                 if d["detection_seconds"] is not None else "")
        print(f"{d['device']:8} {d['shift']:10} {'yes' if d['flagged'] else 'no':8} {d['samples']:>8} "
              f"{d['windows_closed']:>7} {d['windows_stored']:>7} {d['windows_in_spool']:>8} {d['windows_lost']:>5} "
              f"{after:>15}")
    for version, devices in s["flagged_by_version"].items():
        if version != s["model_version"]:
            print(f"after retraining, version {version}: flagged {', '.join(devices)}")
    for d in s.get("deployments", []):
        verdict = "passed" if d["canary_passed"] else f"failed on {', '.join(d['failing'])}" \
            if d["canary_passed"] is False else "undecided"
        print(f"deployment {d['deployment']} ({d['what']}, {d['version']}): {d['state']}, canary {verdict}; "
              + ", ".join(f"{k} {v['version']}" for k, v in sorted(d["devices"].items())))
    if s.get("retrained_version"):
        sa, ca = s["shifted_accuracy"], s["clean_accuracy"]
        print(f"labelled accuracy, version {s['model_version']} -> {s['retrained_version']}: shifted devices "
              f"{_pct(sa['before'])} -> {_pct(sa['after'])}, clean devices {_pct(ca['before'])} -> {_pct(ca['after'])}")
        for d in s["devices"]:
            print(f"  {d['device']:8} {d['shift']:10} {_pct(d['accuracy_before'])} -> {_pct(d['accuracy_after'])}")
        field = s.get("field_data") or {}
        if field:
            print(f"field data added: {field.get('rows_added')} rows ({field.get('devices')}), md5 {field.get('md5')}")
        still = s.get("still_flagged") or {}
        if still:
            print(f"flagged against {still['version']}: {', '.join(still['devices']) or 'none'}: {still['why']}")
    if s["retrain"]:
        r = s["retrain"]
        print(f"retraining (alert {r.get('alert')}): {r.get('state')}, outcome {r.get('outcome')}; versions served: "
              + "; ".join(f"{k}: {', '.join(v)}" for k, v in (r.get("models_served") or {}).items()))
    print(f"alerts: {len(s['alerts'])}; flagged devices (version {s['model_version']}): "
          f"{', '.join(s['flagged']) or 'none'}; shifted devices: {', '.join(s['shifted'])}; "
          f"{'exactly the shifted devices were flagged' if s['exactly_shifted_flagged'] else 'MISMATCH'}; "
          f"windows lost: {s['windows_lost']}")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_kit.demo.fleet", description=__doc__.splitlines()[0])
    p.add_argument("--headless", action="store_true", help="run for --duration seconds, print a summary, exit")
    p.add_argument("--duration", type=float, default=90.0, help="seconds to run headless (default 90)")
    p.add_argument("--approve", action="store_true", help="headless: approve the first alert (runs the retraining)")
    p.add_argument("--bad-bundle", action="store_true",
                   help="then deploy a bundle whose predictions skew: the canary halts and rolls it back")
    p.add_argument("--devices", type=int, default=6, help="simulated devices (default 6; 2, 4 and 6 get shifts)")
    p.add_argument("--window-seconds", type=float, default=4.0, help="agent summary window (default 4)")
    p.add_argument("--workdir", type=Path, default=Path(".edgekit/fleet-demo"), help="the demo's own folder")
    p.add_argument("--config", type=Path, default=EXAMPLE_CONFIG, help="example project config to copy")
    p.add_argument("--bundle", type=Path, help="start from this bundle (default: build one from the demo's project)")
    p.add_argument("--http-port", type=int, default=8080, help="dashboard port (default 8080; 0 picks a free one)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s")
    if not args.debug:  # Alembic announces every plugin and migration step at INFO when storage opens
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.devices < 1:
        p.error("--devices must be at least 1")
    options = DemoOptions(
        workdir=args.workdir, example_config=args.config, bundle=args.bundle, devices=args.devices,
        window_seconds=args.window_seconds, http_port=args.http_port or None, headless=args.headless,
        duration=args.duration, approve=args.approve, bad_bundle=args.bad_bundle,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop cleanly and still print the summary
        signal.signal(sig, lambda *_: stop.set())
    try:
        summary = run_demo(options, stop)
    except (EdgeKitError, UsageError) as exc:
        print(f"fleet-demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, TimeoutError) as exc:
        print(f"fleet-demo: error: {exc} (logs in {args.workdir / 'logs'})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
