"""Tracking store selection, and a run sent to a real MLflow tracking server over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_kit.config import load_config
from edge_kit.train.tracking import flatten_params, resolve_tracking_uri
from tests.helpers.training import make_project, tiny_config


def test_store_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edgekit.toml").write_text("[project]\nname = 'p'\n")
    config = load_config(tmp_path / "edgekit.toml")
    assert resolve_tracking_uri(config) == f"sqlite:///{tmp_path.resolve() / '.edgekit' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(config) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri(config, "sqlite:////elsewhere/m.db") == "sqlite:////elsewhere/m.db"


def test_params_are_the_whole_resolved_config(tmp_path: Path) -> None:
    (tmp_path / "edgekit.toml").write_text("[model]\nkwargs = { hidden = [8] }\n")
    params = flatten_params(load_config(tmp_path / "edgekit.toml"))
    assert params["model.kwargs"] == '{"hidden": [8]}' and params["train.threads"] == "1"
    assert len(params) == sum(len(v) for v in load_config(tmp_path / "edgekit.toml").to_dict().values())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=log, env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"},
        start_new_session=True)  # its own process group: the server and its workers stop together
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.integration
def test_run_goes_to_a_tracking_server(tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from edge_kit.train.run import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # as a team's shared server is usually named
    config_path = make_project(tmp_path / "project", tiny_config(epochs=1))
    result = train(load_config(config_path))
    assert result.tracking_uri == mlflow_server
    assert not (tmp_path / "project" / ".edgekit" / "mlflow.db").exists()  # nothing went to the local store
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(result.run_id, "model")} == {"model/final.pt", "model/model.onnx"}
    stored = list((tmp_path / "server-artifacts").rglob("model.onnx"))
    assert len(stored) == 1 and stored[0].read_bytes() == result.onnx.read_bytes()  # uploaded over HTTP
