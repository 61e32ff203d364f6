"""When the bundle's MLflow run counts as unreachable: cheap checks, before MLflow gets a chance to hang or to
create an empty store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from edge_kit.bench.tracking import log_metrics, unreachable_reason


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sqlite_and_folder_stores_must_exist(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    assert "does not exist" in str(unreachable_reason(f"sqlite:///{db}"))
    db.write_bytes(b"")
    assert unreachable_reason(f"sqlite:///{db}") is None
    assert "does not exist" in str(unreachable_reason((tmp_path / "mlruns").as_uri()))
    assert unreachable_reason(tmp_path.as_uri()) is None


def test_a_dead_tracking_server_is_found_out_fast() -> None:
    t0 = time.monotonic()
    reason = unreachable_reason(f"http://127.0.0.1:{_closed_port()}")
    assert reason is not None and "not reachable" in reason
    assert time.monotonic() - t0 < 5


def test_no_run_in_the_manifest_means_nothing_is_logged() -> None:
    status = log_metrics({"provenance": {}}, {"engines": {}, "host": {}, "flags": []})
    assert status["logged"] is False and "names no MLflow run" in status["reason"]
