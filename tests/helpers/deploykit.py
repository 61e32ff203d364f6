"""Simulated devices for the deployment tests: windows and status documents as agents send them, and a
fleet with a rollout manager over them (`deploy_fleet`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.monitoring.summary import WindowSummary
from device_agent.uplink.wire import status_topic, summary_topic
from edge_kit.fleet.alerts import AlertManager
from edge_kit.fleet.deployments.bundles import BundleFiles, DownloadLimits
from edge_kit.fleet.deployments.rollout import BundleSource, RolloutManager
from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import LABELS, DigitsBundle, make_bundle, sample_images


def window(bundle: DigitsBundle, device: str, start: float, rng: np.random.Generator, *, fleet: str, n: int = 300,
           skew: bool = False, seq: int = 0) -> tuple[str, bytes, str]:
    """(topic, payload, content type) of one window. `skew`: half the inputs are predicted as class 0 (what
    a bundle with broken in-graph preprocessing constants does: it collapses classes), the inputs are clean."""
    x, _ = sample_images(n, rng)
    values = bundle.values(x)
    if skew:
        c = bundle.reference.names.index("out.pred")
        half = rng.random(n) < 0.5
        values[half, c] = 0.0
    s = WindowSummary.zero(bundle.histogrammer, fleet=fleet, device=device, model=bundle.model, window_start=start,
                           seq=seq, label_names=LABELS)
    s.update(bundle.histogrammer, values)
    s.window_end = start + 60.0
    return (summary_topic(fleet, device), *s.to_bytes())


def status(bundle: DigitsBundle, device: str, *, fleet: str, deployment: dict[str, Any] | None = None,
           requests: int = 0, failed: int = 0, p95: float = 2.0) -> tuple[str, bytes, str]:
    doc: dict[str, Any] = {"state": "online", "model": bundle.model,
                           "serving": {"requests": requests, "failed_requests": failed,
                                       "latency_ms": {"p50": p95 / 2, "p95": p95}}}
    if deployment is not None:
        doc["deployment"] = deployment
    return status_topic(fleet, device), json.dumps(doc).encode(), "application/json"


def report(dep_id: str, bundle: DigitsBundle, step: str, at: float, reason: str | None = None,
           sha256: str = "0" * 64) -> dict[str, Any]:
    return {"deployment": dep_id, "version": bundle.model["version"], "sha256": sha256, "step": step,
            "reason": reason, "bytes": 0, "at": at}


FLEET = "test"
DEVICES = [f"dev{i}" for i in range(6)]


@dataclass
class Fleet:
    storage: Storage
    ingestor: Ingestor
    manager: RolloutManager
    service: FleetService
    v1: DigitsBundle
    v2: DigitsBundle
    folder: Path
    rng: np.random.Generator

    def send(self, *messages: tuple[str, bytes, str]) -> None:
        for m in messages:
            self.ingestor.receive(*m)
        self.ingestor.flush()


@contextmanager
def deploy_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Six devices serving v1 for a while, a v1.1.0 bundle beside it, a rollout manager on SQLite."""
    folder = tmp_path / "bundles"
    folder.mkdir()
    v1 = make_bundle(folder, version="1.0.0")
    v2 = make_bundle(folder, version="1.1.0")
    settings = parse_settings({"drift": {"min_n": 50}, "concept": {"min_labels": 100}})
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    references = ReferenceStore(folder=folder)
    ingestor = Ingestor(storage, references, settings.ingest)
    rng = np.random.default_rng(7)
    now = time.time()
    f = Fleet(storage, ingestor, None, None, v1, v2, folder, rng)  # type: ignore[arg-type]
    for w in range(3):  # every device has served v1 for a while: it is the control's old version
        f.send(*[window(v1, d, now - 3000 + 300 * w, rng, fleet=FLEET, seq=w) for d in DEVICES])
    f.send(*[status(v1, d, fleet=FLEET, requests=500, failed=1) for d in DEVICES])
    service = FleetService(storage, references, settings)
    f.service = service
    limits = DownloadLimits(concurrency=1, per_device_factor=1.0)
    f.manager = RolloutManager(storage, settings, references, BundleFiles(folder),
                               AlertManager(storage, settings.alerts), FLEET, "http://fleet.example:8080",
                               download_limits=limits)
    service.deployments = f.manager
    try:
        yield f
    finally:
        storage.close()


def install(f: Fleet, dep: str, devices: list[str], *, skew: bool = False, windows: int = 3) -> None:
    """The devices report the new bundle installed and send `windows` windows of it."""
    now = time.time()
    f.send(*[status(f.v2, d, fleet=FLEET, deployment=report(dep, f.v2, "installed", now), requests=500, failed=1)
             for d in devices])
    for w in range(windows):
        f.send(*[window(f.v2, d, now + 1 + 60 * w, f.rng, fleet=FLEET, skew=skew, seq=10 + w) for d in devices])


def bundle_source(f: Fleet) -> BundleSource:
    return BundleSource.stored(f.manager.files.in_folder(f.v2.path.name), "path")
