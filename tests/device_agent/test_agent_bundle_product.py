"""A real `edge-agent run` serves one product: started on a folder holding signed `digits 2.0.0` and a
signed other model `faces 9.0.0`, it serves digits when its config names it, reports faces as refused,
and refuses to guess (exit 2) when nothing names the product."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.bundles import digits_like_inputs, make_bundle
from harness.processes import MosquittoBroker
from tests.helpers.mqtt import AgentProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def two_products(tmp_path: Path, bundle_v2: Path, signing_key: Ed25519PrivateKey) -> Path:
    folder = tmp_path / "bundles"
    folder.mkdir()
    shutil.copy(bundle_v2, folder / bundle_v2.name)
    os.utime(folder / bundle_v2.name, (1_000, 1_000))
    make_bundle(folder, seed=3, name="faces", version="9.0.0", signing_key=signing_key)  # the newest file
    return folder


def test_the_configured_model_serves_and_the_other_is_reported(
        mosquitto: MosquittoBroker, two_products: Path, tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    agent = AgentProcess(tmp_path, "--bundle", str(two_products), "--broker", mosquitto.url, "--device-id", "dev-p",
                         "--spool", str(tmp_path / "s.db"), "--pubkey", str(keypair[1]),
                         config='[agent]\nmodel_name = "digits"\nrequire_signature = true\n')
    try:
        status = agent.status()
        assert status["model"]["name"] == "digits" and status["model"]["version"] == "2.0.0"
        [refused] = status["rejected_bundles"]
        assert refused["path"].endswith("faces-9.0.0.edgebundle")
        assert "model 'faces'" in refused["error"] and "agent.model_name" in refused["error"]
        assert agent.post("/predict", {"inputs": digits_like_inputs(2).tolist()})["model"]["name"] == "digits"
    finally:
        assert agent.stop() == 0
    # The flag names the other product: the same folder then serves faces and reports digits.
    agent = AgentProcess(tmp_path, "--bundle", str(two_products), "--broker", mosquitto.url, "--device-id", "dev-p",
                         "--spool", str(tmp_path / "s.db"), "--pubkey", str(keypair[1]), "--model-name", "faces")
    try:
        status = agent.status()
        assert status["model"]["name"] == "faces" and status["model"]["version"] == "9.0.0"
        assert [r["path"].endswith("digits-2.0.0.edgebundle") for r in status["rejected_bundles"]] == [True]
    finally:
        assert agent.stop() == 0


def test_without_a_model_name_two_products_are_exit_2(
        edge_agent_cli, two_products: Path, tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    res = edge_agent_cli("run", "--bundle", str(two_products), "--device-id", "d", "--broker", "mqtt://127.0.0.1:1",
                         "--spool", str(tmp_path / "s.db"), "--pubkey", str(keypair[1]), timeout=60)
    assert res.returncode == 2, res.stderr
    assert "agent.model_name" in res.stderr and "'digits'" in res.stderr and "'faces'" in res.stderr
    assert "Traceback" not in res.stderr
