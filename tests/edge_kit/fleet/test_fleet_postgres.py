"""The same storage layer on a real PostgreSQL: ingest with dedup, evaluation, alerts, labels."""

from __future__ import annotations

import sys
import time
import uuid

import numpy as np
import pytest

from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import DigitsBundle, populate, sample_images, summary
from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_storage(postgres: PostgresServer) -> Storage:
    import psycopg

    name = f"fleet_{uuid.uuid4().hex[:8]}"  # a fresh database per test
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return Storage(postgres.url.rsplit("/", 1)[0] + f"/{name}")


def test_postgres_ingest_dedup_evaluate_alert(pg_storage: Storage, digits_bundle: DigitsBundle) -> None:
    assert pg_storage.dialect == "postgresql"
    settings = parse_settings({"drift": {"min_n": 100},
                               "alerts": {"retrain_command": [sys.executable, "-c", "pass"]}})
    references = ReferenceStore([digits_bundle.path])
    ingestor = Ingestor(pg_storage, references, settings.ingest)
    now = time.time()
    populate(ingestor, digits_bundle, devices=4, drifting=("dev00",), now=now)
    assert pg_storage.window_count() == 12
    # QoS-1 duplicates are dropped by the same ON CONFLICT key.
    s = summary(digits_bundle, "dev01", now - 899.0, sample_images(300, np.random.default_rng(1))[0])
    ingestor.receive("edgekit/test/dev01/summary", *s.to_bytes())
    ingestor.flush()
    counters = pg_storage.counters()
    assert pg_storage.window_count() == 12 and counters["accepted"] == 12 and counters["duplicate"] == 1
    service = FleetService(pg_storage, references, settings)
    service.evaluate()
    alerts = pg_storage.alerts()
    assert [a["scope"] for a in alerts if a["scope"].startswith("device:")] == ["device:dev00"]
    assert {r["device"] for r in service.drift()["devices"] if r["drifted"]} == {"dev00"}
    approved = service.alerts.approve(alerts[-1]["id"], "carol")
    service.alerts.wait()
    assert approved["approved_by"] == "carol"
    final = pg_storage.alert(alerts[-1]["id"])
    assert final is not None and final["state"] == "retrained"
    service.add_labels({"device": "dev02", "model_sha256": digits_bundle.sha256, "true": [1, 2], "pred": [1, 3]})
    labelled = service.concept()[0]["labelled"]
    assert labelled["n"] == 2 and labelled["accuracy"] == 0.5
    assert len(pg_storage.latest_windows(digits_bundle.sha256, 0, per_device=2, min_n=100)) == 8
    pg_storage.close()
