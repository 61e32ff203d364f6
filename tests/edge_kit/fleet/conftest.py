from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_kit.fleet.http_security import HttpSecurity
from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.server import make_server, serve_in_thread
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import OPERATOR_TOKEN, DigitsBundle, make_bundle, populate
from tests.helpers.postgres import PostgresServer


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))


RETRAIN_SCRIPT = "import os; print('retrain', os.environ['EDGEKIT_ALERT_ID'])"


@pytest.fixture
def service(tmp_path: Path, digits_bundle: DigitsBundle) -> Iterator[FleetService]:
    settings = parse_settings({
        "drift": {"k": 2, "m": 3, "min_n": 100},
        "alerts": {"retrain_command": [sys.executable, "-c", RETRAIN_SCRIPT],
                   "retrain_min_interval_seconds": 3600},
        "concept": {"min_labels": 100},
    })
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    references = ReferenceStore([digits_bundle.path])
    populate(Ingestor(storage, references, settings.ingest), digits_bundle, drifting=("dev00", "dev01"))
    svc = FleetService(storage, references, settings)
    svc.evaluate()
    try:
        yield svc
    finally:
        svc.stop()
        storage.close()


@pytest.fixture
def http(service: FleetService) -> Iterator[str]:
    # Reads open to loopback (as `fleet serve --open-reads`), changes only with the operator token.
    server = make_server(service, "127.0.0.1", 0, HttpSecurity(token=OPERATOR_TOKEN, open_reads=True))
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()




@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
