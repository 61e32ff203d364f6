"""Deployments reaching real `edge-agent run` processes: a retained message on a real Mosquitto, the bytes
from a real HTTP server (throttled, counting, or altering them) or through a real proxy that cuts the
link; the agent killed with SIGKILL mid-download. Each agent has its own bundles, state and spool."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.deploy.message import DeploymentMessage, encode_deployment_message
from device_agent.uplink.wire import deployment_topic
from harness.bundle_server import BundleServer
from harness.bundles import digits_like_inputs, make_bundle
from harness.processes import MosquittoBroker
from tests.helpers.mqtt import AgentProcess, Subscriber, wait_until
from tests.helpers.tcp_proxy import CuttingProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = "f1"


@pytest.fixture
def broker(tmp_path: Path) -> MosquittoBroker:
    (tmp_path / "broker").mkdir()
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def server() -> BundleServer:
    srv = BundleServer().start()
    yield srv
    srv.stop()


class Device:
    """One simulated device's folders; `start()` runs `edge-agent run` on them."""

    def __init__(self, root: Path, device_id: str, first: Path, pubkey: Path, broker: MosquittoBroker) -> None:
        self.root, self.device_id, self.broker, self.pubkey = root, device_id, broker, pubkey
        self.bundles = root / "bundles"
        self.state = root / "state"
        self.bundles.mkdir(parents=True)
        shutil.copy2(first, self.bundles / first.name)
        self.agent: AgentProcess | None = None

    def start(self) -> AgentProcess:
        config = (f'[deploy]\nenabled = true\nstate_dir = "{self.state}"\nmax_bundle_bytes = 10485760\n'
                  "download_timeout = 10.0\n")
        self.agent = AgentProcess(
            self.root, "--bundle", str(self.bundles), "--broker", self.broker.url, "--device-id", self.device_id,
            "--fleet", FLEET, "--spool", str(self.root / "spool.db"), "--pubkey", str(self.pubkey),
            "--window-seconds", "2", config=config)
        return self.agent

    def status(self) -> dict[str, Any]:
        assert self.agent is not None
        return self.agent.status()

    def step(self) -> str | None:
        block = self.status().get("deployment")
        return None if block is None else str(block["step"])

    def version(self) -> str:
        return str(self.status()["model"]["version"])

    def stop(self) -> None:
        if self.agent is not None and self.agent.proc.poll() is None:
            self.agent.stop()


def _publish(broker: MosquittoBroker, device: str, message: DeploymentMessage) -> None:
    """Publish the retained deployment message, as the fleet server does, and wait for the broker's PUBACK."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-{time.time_ns()}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        info = client.publish(deployment_topic(FLEET, device), encode_deployment_message(message), qos=1, retain=True)
        info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def _install(server: BundleServer, bundle: Path, version: str, deployment: str = "dep-1",
             url: str | None = None) -> DeploymentMessage:
    sha = server.add(bundle)
    return DeploymentMessage(deployment, "install", "digits", version, sha, bundle.stat().st_size,
                             url or server.url(sha), time.time())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_mid_download_finishes_after_restart_fetching_at_most_1_5x(tmp_path, broker, bundle_v1, bundle_v2,
                                                                          keypair):
    server = BundleServer(throttle=16_000).start()  # ~5 s for the 83 kB bundle: time to kill it half way
    device = Device(tmp_path / "dev-a", "dev-a", bundle_v1, keypair[1], broker)
    size = bundle_v2.stat().st_size
    try:
        # Published before the agent runs: a device that was offline acts on the retained message.
        message = _install(server, bundle_v2, "2.0.0")
        _publish(broker, "dev-a", message)
        agent = device.start()
        part = device.state / "staging" / f"{message.sha256}.part"
        wait_until(lambda: server.served.bytes_sent() >= size // 3, 90, "a third of the bundle sent")
        agent.kill9()
        on_disk = part.stat().st_size
        assert 0 < on_disk < size
        sent_before = server.served.bytes_sent()
        server.throttle = 0

        device.start()
        wait_until(lambda: device.step() == "installed", 90, "the install to finish after the restart")
        assert device.version() == "2.0.0"
        assert sorted(p.name for p in device.bundles.iterdir()) == ["digits-2.0.0.edgebundle"]
        resumed = [r for r in server.served.requests if r["range"]]
        assert resumed and resumed[0]["range"] == f"bytes={on_disk}-" and resumed[0]["status"] == 206
        total = server.served.bytes_sent()
        assert total <= 1.5 * size, (total, size, sent_before)
        assert {r["device"] for r in server.served.requests} == {"dev-a"}
        assert device.agent is not None and device.agent.post("/predict", {"inputs": digits_like_inputs(2).tolist()})
    finally:
        device.stop()
        server.stop()


def test_a_cut_link_mid_download_resumes(tmp_path, broker, server, bundle_v1, bundle_v2, keypair):
    size = bundle_v2.stat().st_size
    proxy = CuttingProxy(server.port, cut_after=size // 3, cuts=2)
    device = Device(tmp_path / "dev-b", "dev-b", bundle_v1, keypair[1], broker)
    try:
        device.start()
        sha = server.add(bundle_v2)
        _publish(broker, "dev-b", _install(server, bundle_v2, "2.0.0",
                                           url=f"http://127.0.0.1:{proxy.port}/api/bundles/{sha}"))
        wait_until(lambda: device.step() == "installed", 90, "the install through a link cut twice")
        assert device.version() == "2.0.0"
        assert proxy.cut == 2
        starts = [r["range"] for r in server.served.requests]
        assert starts[0] is None and all(s and s.startswith("bytes=") for s in starts[1:]) and len(starts) == 3
    finally:
        device.stop()
        proxy.close()


def test_refused_deployments_leave_the_old_bundle_serving_then_install_and_roll_back(
        tmp_path, broker, server, bundle_v1, bundle_v2, keypair, signing_key: Ed25519PrivateKey):
    broken = make_bundle(tmp_path / "broken", seed=1, version="3.0.0", signing_key=signing_key,
                         selftest_outputs=np.full((8, 10), 5.0, dtype=np.float32))
    device = Device(tmp_path / "dev-c", "dev-c", bundle_v1, keypair[1], broker)
    subscriber = Subscriber(broker.port, f"edgekit/{FLEET}/dev-c/status", client_id="status-watch")
    try:
        agent = device.start()

        # Bytes altered on the way: refused, reported failed on the status topic, v1 keeps serving.
        altered = _install(server, bundle_v2, "2.0.0", deployment="dep-altered")
        server.alter.add(altered.sha256)
        _publish(broker, "dev-c", altered)
        wait_until(lambda: device.step() == "failed", 60, "the altered download to be refused")
        block = device.status()["deployment"]
        assert block["deployment"] == "dep-altered" and "sha256" in block["reason"]
        assert device.version() == "1.0.0"
        assert agent.post("/predict", {"inputs": digits_like_inputs(3).tolist()})
        wait_until(lambda: _status_steps(subscriber, "dep-altered") >= {"downloading", "failed"}, 30,
                   "downloading and failed on the status topic")
        server.alter.clear()

        # Fails its self-test on the device: refused, never in the bundles folder, v1 keeps serving.
        _publish(broker, "dev-c", _install(server, broken, "3.0.0", deployment="dep-broken"))
        wait_until(lambda: device.status()["deployment"]["deployment"] == "dep-broken"
                   and device.step() == "failed", 60, "the self-test failure")
        assert "self-test" in device.status()["deployment"]["reason"].lower().replace("selftest", "self-test")
        assert device.version() == "1.0.0"
        assert sorted(p.name for p in device.bundles.iterdir()) == ["digits-1.0.0.edgebundle"]
        assert agent.post("/predict", {"inputs": digits_like_inputs(3).tolist()})

        # A good one installs; the rollback returns to the kept v1 (the one path down a version).
        _publish(broker, "dev-c", _install(server, bundle_v2, "2.0.0", deployment="dep-good"))
        wait_until(lambda: device.version() == "2.0.0" and device.step() == "installed", 60, "the install")
        assert device.status()["bundle_sha256"] == _sha(bundle_v2)
        rollback = DeploymentMessage("dep-good", "rollback", "digits", "1.0.0", _sha(bundle_v1), None, None,
                                     time.time())
        _publish(broker, "dev-c", rollback)
        wait_until(lambda: device.step() == "rolled_back", 60, "the rollback")
        assert device.version() == "1.0.0"
        assert sorted(p.name for p in device.bundles.iterdir()) == ["digits-1.0.0.edgebundle"]
        serving = device.status()["serving"]
        assert serving["requests"] == 0 and serving["failed_requests"] == 0
    finally:
        subscriber.close()
        device.stop()


def _status_steps(subscriber: Subscriber, deployment: str) -> set[str]:
    with subscriber.lock:
        docs = [doc for doc, _ in subscriber.status]
    return {d["deployment"]["step"] for d in docs if (d.get("deployment") or {}).get("deployment") == deployment}


def test_a_broker_that_lost_its_sessions_still_delivers_the_deployment(tmp_path, broker, server, bundle_v1,
                                                                       bundle_v2, keypair):
    device = Device(tmp_path / "dev-d", "dev-d", bundle_v1, keypair[1], broker)
    try:
        device.start()
        wait_until(lambda: device.status().get("connected"), 30, "the agent connected")
        # The broker comes back without its persistence: no session, no subscription of the agent's.
        broker.stop()
        for f in broker.workdir.glob("*.db"):
            f.unlink()
        broker.start()
        _publish(broker, "dev-d", _install(server, bundle_v2, "2.0.0"))
        # Only a subscription renewed on the reconnect brings the retained message to the agent.
        wait_until(lambda: device.step() == "installed", 90, "the install after the broker restart")
        assert device.version() == "2.0.0"
    finally:
        device.stop()
