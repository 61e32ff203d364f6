"""The fleet service's state and queries: periodic drift evaluation, alerts, and what the API returns.

Kept apart from HTTP (server.py) and MQTT (ingest.py) so tests and benchmarks drive it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.monitoring.summary_validation import INT64_MAX
from edge_kit.fleet import concept, drift
from edge_kit.fleet.alerts import AlertManager, devices_named
from edge_kit.fleet.consumer_state import ConsumerState
from edge_kit.fleet.reference_index import ModelReference, ReferenceStore
from edge_kit.fleet.settings import FleetSettings
from edge_kit.fleet.storage import Storage

log = logging.getLogger(__name__)


class FleetService:
    def __init__(self, storage: Storage, references: ReferenceStore, settings: FleetSettings) -> None:
        self.storage = storage
        self.references = references
        self.settings = settings
        self.alerts = AlertManager(storage, settings.alerts)
        self.evaluations: dict[str, drift.Evaluation] = {}
        # Set by `fleet serve`: whether each MQTT consumer process is connected (None: no consumers here).
        self.consumers: ConsumerState | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # (name, check) pairs for /healthz: a check returns None when fine, else what is wrong.
        self.readiness_checks: list[tuple[str, Callable[[], str | None]]] = []
        # Set by `fleet serve`: the rollout manager (`edge_kit.fleet.deployments`); None: no deployments here.
        self.deployments: Any = None
        # Set by `enable_captures` (`edge_kit.fleet.captures`): the capture store and index, the requests.
        self.captures: Any = None
        self.capture_requests: Any = None

    def enable_captures(self, captures: Any, requests: Any) -> None:
        """Keep field captures (`captures.intake.Captures`) and send capture requests
        (`captures.requests.CaptureRequests`); with `[captures] request_on_alert`, an approved alert asks
        each device it names for that many samples."""
        self.captures, self.capture_requests = captures, requests
        samples = self.settings.captures.request_on_alert
        if samples and requests is not None:
            def ask(alert: dict[str, Any]) -> None:
                for device in devices_named(alert):
                    requests.create(device, samples, f"{alert['kind'].replace('_', ' ')} alert {alert['id']}")

            self.alerts.on_approved.append(ask)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, now: float | None = None) -> dict[str, drift.Evaluation]:
        """Evaluate every model version with recent windows; raise alerts; return the evaluations."""
        now = time.time() if now is None else now
        d = self.settings.drift
        recent = set(self.storage.models_with_windows(now - d.lookback_seconds))
        for ref in self.references.all():
            if ref.sha256 not in recent:
                continue
            try:
                self._evaluate_one(ref, now)
            except Exception:  # one model's failure must not stop the others' evaluation and alerts
                log.exception("drift evaluation of %s %s failed", ref.name, ref.version)
        return self.evaluations

    def _evaluate_one(self, ref: ModelReference, now: float) -> None:
        d = self.settings.drift
        ev = drift.evaluate_model(self.storage, ref, d, now)
        self.evaluations[ref.sha256] = ev
        label = f"{ref.name} {ref.version}"
        if ev.fleet_alert:
            self.alerts.raise_alert(ref.sha256, "fleet", "data_drift",
                                    f"{label}: fleet-wide drift in {len(ev.fleet_channels)} channel(s): "
                                    f"{', '.join(ev.fleet_channels[:5])}",
                                    {"channels": ev.fleet_channels, "flags": ev.fleet_flags},
                                    support=ev.fleet_support)
        for device, channels in ev.device_alerts.items():
            self.alerts.raise_alert(ref.sha256, f"device:{device}", "data_drift",
                                    f"{label}: device {device} drifted in {', '.join(channels[:5])}",
                                    {"device": device, "channels": channels, "cutoff": ev.cutoff})
        acc = concept.labelled_accuracy(self.storage, ref, now - d.lookback_seconds, self.settings.concept,
                                        d.alpha)
        if acc is not None and acc["drifted"]:
            self.alerts.raise_alert(ref.sha256, "fleet", "accuracy_drop",
                                    f"{label}: labelled accuracy {acc['accuracy']:.3f} below the gate's "
                                    f"{acc['gate_accuracy']:.3f} - {self.settings.concept.max_accuracy_drop}",
                                    {k: acc[k] for k in ("n", "accuracy", "gate_accuracy", "p_value")},
                                    support=acc["devices_below_floor"])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="drift-evaluation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.alerts.wait(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.evaluate()
            except Exception:  # keep serving: one failed evaluation is logged and retried next round
                log.exception("drift evaluation failed")
            self._stop.wait(self.settings.drift.evaluate_every_seconds)

    # -- queries for the API -----------------------------------------------------------------

    def _ref(self, model: str | None) -> ModelReference | None:
        if model is None:
            return None
        for ref in self.references.all():
            if ref.sha256 == model or ref.sha256.startswith(model):
                return ref
        return None

    def devices(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        offline_after = self.settings.ingest.offline_after_seconds
        devices = self.storage.devices()
        for dev in devices:
            stale = now - float(dev["last_seen"]) > offline_after
            dev["online"] = dev["state"] == "online" and not stale
        models = []
        for ref in self.references.all():
            info = ref.describe()
            info["devices"] = sum(1 for dev in devices if dev["model_sha256"] == ref.sha256)
            info["windows"] = self.storage.window_count(ref.sha256)
            models.append(info)
        out = {"devices": devices, "models": models, "bundles": self.references.describe(),
               "online": sum(1 for d in devices if d["online"]),
               "offline": sum(1 for d in devices if not d["online"])}
        if self.captures is not None:  # held / labelled per device and model version, for the dashboard
            out["captures"] = self.captures.counts()["counts"]
        return out

    def drift(self, model: str | None = None, device: str | None = None, channel: str | None = None,
              history: bool = False) -> dict[str, Any]:
        refs = [r for r in self.references.all() if model is None or r.sha256.startswith(model)]
        since = time.time() - self.settings.drift.lookback_seconds
        results: list[dict[str, Any]] = []
        devices: list[dict[str, Any]] = []
        evaluations = {}
        for ref in refs:
            ev = self.storage.evaluation(ref.sha256)
            if ev is None:
                continue
            evaluations[ref.sha256] = ev
            meta = {"model": ref.sha256, "model_name": ref.name, "model_version": ref.version}
            if device is not None:
                rows = drift.device_channels(self.storage, ref, device, self.settings.drift, float(ev["cutoff"]))
                results += [{**meta, **r} for r in rows if channel is None or r["channel"] == channel]
                continue
            rows = self.storage.fleet_drift(ref.sha256, channel, since)
            if not history and rows:
                latest = max(r["window_start"] for r in rows)
                rows = [r for r in rows if r["window_start"] == latest]
            results += [{**meta, "scope": "fleet", **r} for r in rows]
            per_device = self.storage.device_drift(ref.sha256, since=since)
            if not history:
                last: dict[str, dict[str, Any]] = {}
                for r in per_device:
                    last[r["device"]] = r
                per_device = list(last.values())
            devices += [{**meta, "scope": "device", **r} for r in per_device]
        return {"results": results, "devices": devices, "evaluations": evaluations,
                "alpha": self.settings.drift.alpha}

    def histogram(self, model: str, channel: str, device: str | None = None) -> dict[str, Any] | None:
        ref = self._ref(model)
        if ref is None or channel not in ref.channel_names:
            return None
        # "Current" is the latest fleet bucket's span, so the picture matches the latest test.
        span = self.settings.drift.fleet_window_seconds
        since = np.floor(time.time() / span) * span - span * (self.settings.drift.m - 1)
        return drift.pooled_histogram(self.storage, ref, channel, float(since), device)

    def concept(self, model: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        since = time.time() - self.settings.drift.lookback_seconds
        out = []
        for ref in self.references.all():
            if model is not None and not ref.sha256.startswith(model):
                continue
            entry: dict[str, Any] = {"model": ref.sha256, "model_name": ref.name, "model_version": ref.version}
            entry["labelled"] = concept.labelled_accuracy(self.storage, ref, since, self.settings.concept,
                                                          self.settings.drift.alpha, device)
            entry["estimated"] = concept.estimated_accuracy(self.storage, ref, since, device)
            out.append(entry)
        return out

    def add_labels(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/labels: {"device", "model_sha256", and "confusion" or "true" + "pred"}."""
        device, model = body.get("device"), body.get("model_sha256")
        if not isinstance(device, str) or not isinstance(model, str):
            raise ValueError("labels need string 'device' and 'model_sha256'")
        if not 0 < len(device) <= 128 or "\x00" in device or not device.isprintable():
            raise ValueError("'device' must be 1 to 128 printable characters")
        ref = self.references.get(model)
        if ref is None:
            raise ValueError(f"unknown model sha256 {model[:16]}...")
        k = len(ref.labels)
        if "confusion" in body:
            m = np.asarray(body["confusion"])  # object dtype for integers beyond 64 bits: refused below
            if (m.shape != (k, k) or m.dtype.kind not in "iu" or (m < 0).any()
                    or int(m.max(initial=0)) > INT64_MAX or sum(int(v) for v in m.reshape(-1)) > INT64_MAX):
                raise ValueError(f"'confusion' must be a {k}x{k} matrix of non-negative integers under 2**63")
            m = m.astype(np.int64)
        else:
            t, p = body.get("true", []), body.get("pred", [])
            if not all(isinstance(v, list) and all(type(x) is int for x in v) for v in (t, p)):
                raise ValueError("'true' and 'pred' must be lists of integer class indices")
            try:
                m = concept.confusion_from_labels(t, p, k)
            except OverflowError as exc:  # an index beyond 64 bits
                raise ValueError(f"'true' and 'pred' must be class indices in [0, {k})") from exc
        self.storage.add_labels(device, ref.sha256, m.tobytes())
        return {"ok": True, "n": int(m.sum())}

    def health(self) -> dict[str, Any]:
        """GET /healthz: ready when every check passes: the database answers and every MQTT consumer of
        this server is connected (consumer processes publish their state into shared memory)."""
        checks: dict[str, str] = {}
        for name, check in [("database", self._database_ok), ("broker", self._consumers_connected),
                            *self.readiness_checks]:
            try:
                problem = check()
            except Exception as exc:  # a failing check is a "not ready", never a crash of the probe
                problem = f"{type(exc).__name__}: {exc}"[:200]
            checks[name] = problem or "ok"
        consumers = self.consumers.snapshot() if self.consumers is not None else []
        return {"ready": all(v == "ok" for v in checks.values()), "checks": checks,
                "broker_connected": checks["broker"] == "ok", "consumers": consumers}

    def _database_ok(self) -> str | None:
        self.storage.counters()
        return None

    def _consumers_connected(self) -> str | None:
        consumers = self.consumers.snapshot() if self.consumers is not None else []
        down = [str(c["worker"]) for c in consumers if not c["connected"]]
        return f"MQTT consumer(s) {', '.join(down)} not connected to the broker" if down else None

    def metrics(self) -> str:
        """Prometheus text exposition: ingest counters, device gauges, drift gauges, alerts."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        counters = self.storage.counters()
        family("edgekit_fleet_summaries_total", "counter", "Summaries received, by outcome.")
        for outcome in ("accepted", "duplicate"):
            lines.append(f'edgekit_fleet_summaries_total{{outcome="{outcome}"}} {counters.get(outcome, 0)}')
        family("edgekit_fleet_rejected_total", "counter", "Messages rejected, by kind of problem.")
        for name, value in sorted(counters.items()):
            if name.startswith("rejected:"):
                lines.append(f'edgekit_fleet_rejected_total{{kind="{_esc(name[9:])}"}} {value}')
        family("edgekit_fleet_bundles_rejected_total", "counter",
               "Bundle files not used as a reference (unsigned, bad_signature, unreadable, reference_conflict).")
        for kind, value in sorted(self.references.rejection_counts().items()):
            lines.append(f'edgekit_fleet_bundles_rejected_total{{kind="{_esc(kind)}"}} {value}')
        if self.consumers is not None:
            consumers = self.consumers.snapshot()
            family("edgekit_fleet_mqtt_connected", "gauge", "1 while the consumer is connected to the broker.")
            lines += [f'edgekit_fleet_mqtt_connected{{worker="{c["worker"]}"}} {int(c["connected"])}'
                      for c in consumers]
            family("edgekit_fleet_mqtt_reconnects_total", "counter", "Reconnections to the broker after a loss.")
            lines += [f'edgekit_fleet_mqtt_reconnects_total{{worker="{c["worker"]}"}} {c["reconnects"]}'
                      for c in consumers]
        dev = self.devices()
        family("edgekit_fleet_devices", "gauge", "Devices by state.")
        lines.append(f'edgekit_fleet_devices{{state="online"}} {dev["online"]}')
        lines.append(f'edgekit_fleet_devices{{state="offline"}} {dev["offline"]}')
        drift_now = self.drift()
        family("edgekit_fleet_drift_p_value", "gauge", "Latest fleet-level corrected p-value per channel.")
        gauges = [("edgekit_fleet_drift_p_value", "p_value"), ("edgekit_fleet_drift_effect", "effect"),
                  ("edgekit_fleet_drifted", "drifted")]
        for metric, key in gauges:
            if metric != "edgekit_fleet_drift_p_value":
                family(metric, "gauge", "Latest fleet-level " + ("effect size" if key == "effect" else
                                                                 "drift flag (1 = drifted)") + " per channel.")
            for r in drift_now["results"]:
                labels = (f'model="{_esc(r["model_name"])}",version="{_esc(r["model_version"])}",'
                          f'channel="{_esc(r["channel"])}"')
                lines.append(f"{metric}{{{labels}}} {float(r[key]):.6g}")
        family("edgekit_fleet_devices_drifted", "gauge", "Devices whose latest window drifted.")
        by_model: dict[tuple[str, str], int] = {}
        for r in drift_now["devices"]:
            key2 = (r["model_name"], r["model_version"])
            by_model[key2] = by_model.get(key2, 0) + int(r["drifted"])
        for (name, version), count in sorted(by_model.items()):
            lines.append(f'edgekit_fleet_devices_drifted{{model="{_esc(name)}",version="{_esc(version)}"}} {count}')
        family("edgekit_fleet_alerts", "gauge", "Alerts by state.")
        states: dict[str, int] = {}
        for a in self.storage.alerts():
            states[a["state"]] = states.get(a["state"], 0) + 1
        for state, count in sorted(states.items()):
            lines.append(f'edgekit_fleet_alerts{{state="{state}"}} {count}')
        if self.deployments is not None:
            lines += self.deployments.metrics()
        if self.captures is not None:
            counts = self.captures.counts()
            family("edgekit_fleet_captures", "gauge", "Captured records held in the capture store, and those labelled.")
            lines.append(f'edgekit_fleet_captures{{state="held"}} {counts["total"]["held"]}')
            lines.append(f'edgekit_fleet_captures{{state="labelled"}} {counts["total"]["labelled"]}')
            family("edgekit_fleet_capture_store_bytes", "gauge", "Bytes of the capture store, used and its quota.")
            lines.append(f'edgekit_fleet_capture_store_bytes{{kind="used"}} {counts["store"]["used_bytes"]}')
            lines.append(f'edgekit_fleet_capture_store_bytes{{kind="max"}} {counts["store"]["max_bytes"]}')
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
