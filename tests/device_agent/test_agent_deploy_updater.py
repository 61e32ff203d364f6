"""The deployment updater in-process: a real Agent (ONNX Runtime), real bundle files, bytes over a real
HTTP server. What reaches the bundles folder, what serves, what is kept, and what is reported."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent
from device_agent.bundle.signing import load_public_key
from device_agent.deploy.download import DownloadPolicy
from device_agent.deploy.message import (
    FAILED,
    INSTALLED,
    ROLLED_BACK,
    DeploymentMessage,
    encode_deployment_message,
)
from device_agent.deploy.updater import DeploymentUpdater
from harness.bundle_server import BundleServer
from harness.bundles import digits_like_inputs, make_bundle

POLICY = DownloadPolicy(timeout=10, give_up_after=30, backoff_min=0.05, backoff_max=0.2)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def broken_selftest(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    """Signed and well-formed, but its recorded self-test outputs are not what the model computes."""
    return make_bundle(tmp_path_factory.mktemp("bad"), seed=1, version="3.0.0", signing_key=signing_key,
                       selftest_outputs=np.full((8, 10), 5.0, dtype=np.float32))


@pytest.fixture
def server() -> BundleServer:
    srv = BundleServer().start()
    yield srv
    srv.stop()


class Device:
    """An agent serving from its own bundles folder, with its own state folder and updater."""

    def __init__(self, root: Path, first: Path, pubkey: Path) -> None:
        self.root = root
        self.bundles = root / "bundles"
        self.bundles.mkdir(parents=True)
        shutil.copy2(first, self.bundles / first.name)
        self.agent = Agent(self.bundles, public_key=load_public_key(pubkey), device_id="dev-1")
        self.updater = self._updater()

    def _updater(self) -> DeploymentUpdater:
        return DeploymentUpdater(self.agent, bundles_dir=self.bundles, state_dir=self.root / "state",
                                 max_bundle_bytes=10 * 1024**2, policy=POLICY)

    def restart_updater(self) -> DeploymentUpdater:
        self.updater = self._updater()
        return self.updater

    @property
    def version(self) -> str:
        return self.agent.model.runtime.info.version

    def files(self) -> list[str]:
        return sorted(p.name for p in self.bundles.iterdir())

    def kept(self) -> list[str]:
        return sorted(p.name for p in (self.root / "state" / "kept").iterdir())


def _message(server: BundleServer, bundle: Path, version: str, *, action: str = "install",
             deployment: str = "dep-1") -> DeploymentMessage:
    sha = server.add(bundle)
    return DeploymentMessage(deployment, action, "digits", version, sha, bundle.stat().st_size, server.url(sha),
                             time.time())


def test_install_swaps_in_keeps_the_old_one_and_a_rollback_returns_to_it(tmp_path, bundle_v1, bundle_v2, keypair,
                                                                          server):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    report = device.updater.handle(_message(server, bundle_v2, "2.0.0"))
    assert report is not None and report.step == INSTALLED, report
    assert device.version == "2.0.0"
    assert device.files() == ["digits-2.0.0.edgebundle"]  # a restart serves what was installed
    assert device.kept() == [f"{_sha(bundle_v1)}.edgebundle"]
    assert device.updater.serving_sha256() == _sha(bundle_v2)
    assert device.agent.predict(digits_like_inputs(2)).classes.shape == (2,)
    status = device.agent.status()
    assert status["serving"]["requests"] == 1 and status["serving"]["latency_ms"]["p50"] > 0

    back = DeploymentMessage("dep-1", "rollback", "digits", "1.0.0", _sha(bundle_v1), None, None, time.time())
    report = device.updater.handle(back)
    assert report is not None and report.step == ROLLED_BACK, report
    assert device.version == "1.0.0"
    assert device.files() == ["digits-1.0.0.edgebundle"]
    assert f"{_sha(bundle_v2)}.edgebundle" in device.kept()
    assert device.agent.status()["serving"]["requests"] == 0  # figures restart with the model


def test_the_same_retained_message_after_a_restart_is_not_acted_on_twice(tmp_path, bundle_v1, bundle_v2, keypair,
                                                                        server):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    message = _message(server, bundle_v2, "2.0.0")
    assert device.updater.handle(message).step == INSTALLED  # type: ignore[union-attr]
    requests = len(server.served.requests)
    updater = device.restart_updater()
    assert updater.status() is not None and updater.status()["step"] == INSTALLED  # type: ignore[index]
    assert updater.handle(message) is None
    assert len(server.served.requests) == requests


def test_altered_bytes_are_refused_and_the_old_bundle_keeps_serving(tmp_path, bundle_v1, bundle_v2, keypair,
                                                                    server):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    message = _message(server, bundle_v2, "2.0.0")
    server.alter.add(message.sha256)
    report = device.updater.handle(message)
    assert report is not None and report.step == FAILED and "sha256" in (report.reason or "")
    assert device.version == "1.0.0" and device.files() == ["digits-1.0.0.edgebundle"]
    assert list((tmp_path / "d" / "state" / "staging").iterdir()) == []


def test_a_bundle_failing_its_self_test_never_reaches_the_folder(tmp_path, bundle_v1, broken_selftest, keypair,
                                                                 server):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    report = device.updater.handle(_message(server, broken_selftest, "3.0.0"))
    assert report is not None and report.step == FAILED and "self" in (report.reason or "").lower(), report
    assert device.version == "1.0.0" and device.files() == ["digits-1.0.0.edgebundle"]
    assert device.kept() == []


def test_a_bundle_signed_by_another_key_is_refused(tmp_path, bundle_v1, keypair, server):
    foreign = make_bundle(tmp_path / "foreign", seed=1, version="2.0.0", signing_key=Ed25519PrivateKey.generate())
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    report = device.updater.handle(_message(server, foreign, "2.0.0"))
    assert report is not None and report.step == FAILED and "signature" in (report.reason or ""), report
    assert device.version == "1.0.0" and device.files() == ["digits-1.0.0.edgebundle"]


def test_an_install_may_not_go_down_a_version(tmp_path, bundle_v1, bundle_v2, keypair, server):
    device = Device(tmp_path / "d", bundle_v2, keypair[1])
    report = device.updater.handle(_message(server, bundle_v1, "1.0.0"))
    assert report is not None and report.step == FAILED and "not newer" in (report.reason or ""), report
    assert device.version == "2.0.0"


def test_a_message_lying_about_the_version_is_refused(tmp_path, bundle_v1, bundle_v2, keypair, server):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    report = device.updater.handle(_message(server, bundle_v2, "2.0.1"))
    assert report is not None and report.step == FAILED and "names digits 2.0.1" in (report.reason or "")
    assert device.version == "1.0.0"


def test_rollback_only_to_a_kept_bundle(tmp_path, bundle_v1, bundle_v2, keypair, server):
    device = Device(tmp_path / "d", bundle_v2, keypair[1])
    # v1 never served here: nothing to return to, even though the fleet could serve it.
    report = device.updater.handle(DeploymentMessage("dep-9", "rollback", "digits", "1.0.0", _sha(bundle_v1), None,
                                                     None, time.time()))
    assert report is not None and report.step == FAILED and "no kept bundle" in (report.reason or "")
    assert device.version == "2.0.0"


def test_invalid_messages_are_counted_and_ignored(tmp_path, bundle_v1, keypair):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    device.updater.on_message("t", b"{not json", True)
    device.updater.on_message("t", json.dumps({"schema": "edgekit.deployment/1", "action": "format-disk"}).encode(),
                              True)
    device.updater.on_message("t", b"", True)  # a cleared topic is not a message
    counts = device.updater.message_counts()
    assert counts["received"] == 2 and counts["invalid"] == {"not_json": 1, "bad_field": 1}
    assert device.updater.status() is None


def test_the_worker_thread_acts_on_the_newest_message(tmp_path, bundle_v1, bundle_v2, keypair, server):
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    device.updater.start()
    try:
        device.updater.on_message("t", encode_deployment_message(_message(server, bundle_v2, "2.0.0")), True)
        deadline = time.monotonic() + 60
        while device.version != "2.0.0" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        device.updater.stop()
    assert device.version == "2.0.0" and device.updater.status()["step"] == INSTALLED  # type: ignore[index]


def _run_with_deploy(tmp_path: Path, bundle: Path, *extra: str) -> tuple[int, dict[str, object]]:
    from harness.processes import run_cli

    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[deploy]\nenabled = true\nstate_dir = "{tmp_path / "state"}"\n')
    r = run_cli("device_agent", "run", "--config", str(cfg), "--bundle", str(bundle), "--device-id", "d1",
                "--broker", "mqtt://127.0.0.1:9", "--json", *extra, timeout=120)
    return r.returncode, r.json()


def test_deploy_needs_a_public_key_and_a_bundle_folder(tmp_path, bundle_v1, keypair):
    code, out = _run_with_deploy(tmp_path, bundle_v1.parent)
    assert code == 2 and "deploy.enabled" in str(out["error"]) and "pubkey" in str(out["error"])
    code, out = _run_with_deploy(tmp_path, bundle_v1, "--pubkey", str(keypair[1]))
    assert code == 2 and "folder" in str(out["error"])
    assert not (tmp_path / "state").exists()


def test_a_cleared_topic_stops_the_download_in_progress_and_installs_nothing(tmp_path, bundle_v1, bundle_v2,
                                                                             keypair):
    slow = BundleServer(throttle=20_000).start()
    device = Device(tmp_path / "d", bundle_v1, keypair[1])
    device.updater.start()
    try:
        message = _message(slow, bundle_v2, "2.0.0")
        device.updater.on_message("t", encode_deployment_message(message), True)
        deadline = time.monotonic() + 30
        while slow.served.bytes_sent() < 20_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        device.updater.on_message("t", b"", True)  # the fleet halted the rollout: the topic is cleared
        while (device.updater.status() or {}).get("step") != FAILED and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        device.updater.stop()
        slow.stop()
    status = device.updater.status()
    assert status is not None and status["step"] == FAILED and "cleared" in status["reason"]
    assert device.version == "1.0.0" and device.files() == ["digits-1.0.0.edgebundle"]
    assert 0 < (tmp_path / "d" / "state" / "staging" / f"{message.sha256}.part").stat().st_size < message.size  # type: ignore[operator]


def test_a_kill_between_the_swap_and_keeping_the_old_bundle_is_finished_on_the_next_message(
        tmp_path, bundle_v1, bundle_v2, keypair, server):
    # What a kill right after the swap leaves on disk: both bundles in the folder (the new one serves
    # after the restart, as the higher version) and the journal naming the one that served before.
    root = tmp_path / "d"
    (root / "bundles").mkdir(parents=True)
    (root / "state").mkdir()
    old = root / "bundles" / bundle_v1.name
    shutil.copy2(bundle_v1, old)
    shutil.copy2(bundle_v2, root / "bundles" / bundle_v2.name)
    (root / "state" / "deployment.json").write_text(json.dumps({"report": None, "finished": {},
                                                                "previous": str(old)}))
    agent = Agent(root / "bundles", public_key=load_public_key(keypair[1]), device_id="dev-1")
    assert agent.model.runtime.info.version == "2.0.0"
    updater = DeploymentUpdater(agent, bundles_dir=root / "bundles", state_dir=root / "state",
                                max_bundle_bytes=10 * 1024**2, policy=POLICY)
    report = updater.handle(_message(server, bundle_v2, "2.0.0"))  # the retained message, delivered again
    assert report is not None and report.step == INSTALLED
    assert sorted(p.name for p in (root / "bundles").iterdir()) == ["digits-2.0.0.edgebundle"]
    assert (root / "state" / "kept" / f"{_sha(bundle_v1)}.edgebundle").is_file()
    assert server.served.requests == []  # nothing downloaded: it already serves
