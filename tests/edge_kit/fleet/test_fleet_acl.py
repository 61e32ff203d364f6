"""deploy/mosquitto.conf and deploy/mosquitto.acl, run as shipped (ports and paths substituted) in a real
Mosquitto, with identities from `edge-kit fleet enroll`: no device speaks for another (the broker and a
real `fleet serve` on the service identity both refuse), an un-enrolled client cannot connect, a revoked
device cannot come back, and a real `edge-agent run` connects with its enrolled identity."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.uplink.wire import deployment_topic, status_topic, summary_topic
from edge_kit.fleet.identity import SERVICE_IDENTITY, FleetCA
from harness.bundles import digits_like_inputs
from harness.bundles import make_bundle as make_agent_bundle
from harness.fleetkit import DigitsBundle, sample_images, summary
from harness.processes import REPO_ROOT, MosquittoBroker, cli_env, free_port, run_cli
from tests.helpers.mqtt import AgentProcess, wait_until
from tests.helpers.tls_certs import make_pki

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "acl"
DEPLOYED = "/etc/mosquitto/edgekit/"


@dataclass(frozen=True)
class Identity:
    ca: Path
    cert: Path
    key: Path


def deployed_broker(workdir: Path, ca: FleetCA, broker_id: Identity) -> MosquittoBroker:
    """deploy/mosquitto.conf + deploy/mosquitto.acl with this test's port, files and fleet name."""
    broker = MosquittoBroker(workdir)
    files = {"broker.pem": broker_id.cert, "broker.key": broker_id.key, "ca.pem": ca.cert_path,
             "crl.pem": ca.crl_path, "mosquitto.acl": workdir / "mosquitto.acl"}
    acl = (REPO_ROOT / "deploy" / "mosquitto.acl").read_text()
    assert "edgekit/default/%u/summary" in acl
    (workdir / "mosquitto.acl").write_text(acl.replace("edgekit/default/", f"edgekit/{FLEET}/"))
    conf = (REPO_ROOT / "deploy" / "mosquitto.conf").read_text()
    for name, path in files.items():
        assert f"{DEPLOYED}{name}" in conf, name
        conf = conf.replace(f"{DEPLOYED}{name}", str(path))
    assert "\nlistener 8883\n" in conf and "persistence_location /var/lib/mosquitto/\n" in conf
    conf = conf.replace("\nlistener 8883\n", f"\nlistener {broker.port} 127.0.0.1\n")
    conf = conf.replace("persistence_location /var/lib/mosquitto/\n", f"persistence_location {workdir}/\n")
    # Started as root, Mosquitto drops to user "mosquitto", which cannot read pytest's private tmp dirs.
    broker.config.write_text(("user root\n" if os.geteuid() == 0 else "") + conf)
    broker.start()
    return broker


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[FleetCA, dict[str, Identity], MosquittoBroker]]:
    """A fleet CA with devices dev1, dev2 (dev1 through the real CLI), the service and the broker."""
    ca = FleetCA(tmp_path / "ca")
    out = run_cli("edge_kit", "fleet", "enroll", "dev1", "--ca", str(ca.folder), "--out", str(tmp_path / "dev1"),
                  "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    enrolled = tmp_path / "dev1"
    ids = {"dev1": Identity(enrolled / "ca.pem", enrolled / "dev1.pem", enrolled / "dev1.key")}
    roles = (("dev2", "device", ()), ("service", "service", ()), ("broker", "broker", ("127.0.0.1",)))
    for name, role, hosts in roles:
        issued = ca.issue(name, tmp_path / name, role=role, hosts=hosts)
        ids[name] = Identity(issued.ca, issued.cert, issued.key)
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = deployed_broker(workdir, ca, ids["broker"])
    try:
        yield ca, ids, broker
    finally:
        broker.stop()


class Client:
    """A paho MQTT 5 client over TLS with an identity (or none); records what the broker answers."""

    def __init__(self, broker: MosquittoBroker, name: str, identity: Identity | None, *,
                 ca: Path | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca or identity.ca),  # type: ignore[union-attr]
                            certfile=str(identity.cert) if identity else None,
                            keyfile=str(identity.key) if identity else None)
        self.connected = threading.Event()
        self.acks: list[tuple[int, int]] = []  # (mid, reason code)
        self.received: list[str] = []
        self.granted: list[int] = []
        self.client.on_connect = self._on_connect
        self.client.on_publish = lambda c, u, mid, reason, p: self.acks.append((mid, reason.value))
        self.client.on_message = lambda c, u, msg: self.received.append(msg.topic)
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.granted.extend(r.value for r in reasons)
        self.error: BaseException | None = None
        try:
            self.client.connect("127.0.0.1", broker.port)
        except (ssl.SSLError, OSError) as exc:  # the broker refused the handshake outright
            self.error = exc
            return
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason == 0:
            self.connected.set()

    def wait_connected(self, timeout: float = 5.0) -> bool:
        return self.error is None and self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, content_type: str) -> int:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = content_type
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(10)
        return dict(self.acks)[info.mid] if info.mid in dict(self.acks) else wait_until(
            lambda: dict(self.acks).get(info.mid), 10, "the PUBACK")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def connects(broker: MosquittoBroker, identity: Identity | None, *, ca: Path | None = None,
             name: str = "probe") -> bool:
    client = Client(broker, name, identity, ca=ca)
    try:
        return client.wait_connected()
    finally:
        client.close()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


def _healthy(url: str) -> bool:
    try:
        return bool(_get(url))
    except OSError:  # 503 while a consumer is not connected yet, or nothing listening
        return False


def _metric(base: str, name: str) -> float:
    for line in _get(f"{base}/metrics").decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def fleet_serve(broker: MosquittoBroker, service: Identity, bundle: DigitsBundle, tmp_path: Path) -> Iterator[str]:
    """A real `edge-kit fleet serve` connecting with the service identity; yields its base URL."""
    port = free_port()
    log = tmp_path / "fleet.log"
    argv = [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", f"mqtts://127.0.0.1:{broker.port}",
            "--mqtt-ca-certs", str(service.ca), "--mqtt-certfile", str(service.cert), "--mqtt-keyfile",
            str(service.key), "--db", f"sqlite:///{tmp_path}/fleet.db", "--http", f"127.0.0.1:{port}",
            "--fleet", FLEET, "--bundle", str(bundle.path), "--open-reads"]
    with log.open("wb") as out:
        server = subprocess.Popen(argv, env=cli_env(), stdout=out, stderr=out, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until(lambda: server.poll() is None and _healthy(f"{base}/healthz"), 120,
                       "fleet serve connected with its enrolled identity")
        except AssertionError:
            raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
        yield base
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def test_a_device_speaks_only_for_itself(pki: Any, tmp_path: Path, digits_bundle: DigitsBundle) -> None:
    _, ids, broker = pki
    clients: list[Client] = []
    with fleet_serve(broker, ids["service"], digits_bundle, tmp_path) as base:
        try:
            dev1, dev2 = Client(broker, "dev1", ids["dev1"]), Client(broker, "dev2", ids["dev2"])
            watcher = Client(broker, "service-watch", ids["service"])  # the service identity reads everything
            clients += [dev1, dev2, watcher]
            assert dev1.wait_connected() and dev2.wait_connected() and watcher.wait_connected()
            watcher.client.subscribe(f"edgekit/{FLEET}/#", qos=1)
            dev1.client.subscribe(deployment_topic(FLEET, "dev2"), qos=1)  # reading another device's orders
            dev2.client.subscribe(deployment_topic(FLEET, "dev2"), qos=1)
            wait_until(lambda: len(watcher.granted) == 1 and len(dev1.granted) == 1 and len(dev2.granted) == 1, 10,
                       "the subscriptions")
            # The fleet is subscribed once it has stored a device's retained status.
            assert dev1.publish(status_topic(FLEET, "dev1"), b'{"state": "online"}', "application/json") == 0
            wait_until(lambda: any(d["device"] == "dev1" for d in json.loads(_get(f"{base}/api/devices"))["devices"]),
                       60, "the fleet to store dev1's status")
            rng = np.random.default_rng(0)
            now = time.time()

            def payload(device: str, start: float) -> tuple[bytes, str]:
                return summary(digits_bundle, device, start, sample_images(50, rng)[0], fleet=FLEET).to_bytes()

            assert dev1.publish(summary_topic(FLEET, "dev1"), *payload("dev1", now - 600)) == 0
            # dev1 forges a complete, self-consistent summary for dev2 on dev2's topic: refused by the broker.
            assert dev1.publish(summary_topic(FLEET, "dev2"), *payload("dev2", now - 540)) == 135  # Not authorized
            assert dev1.publish(status_topic(FLEET, "dev2"), b'{"state": "offline"}', "application/json") == 135
            # dev1 may publish on its own topic, but a payload claiming dev2 there is refused by the fleet.
            assert dev1.publish(summary_topic(FLEET, "dev1"), *payload("dev2", now - 480)) == 0
            assert dev2.publish(summary_topic(FLEET, "dev2"), *payload("dev2", now - 420)) == 0
            # A device cannot publish deployments; the service can, and only the addressed device reads them.
            assert dev1.publish(deployment_topic(FLEET, "dev2"), b"{}", "application/json") == 135
            assert watcher.publish(deployment_topic(FLEET, "dev2"), b'{"x": 1}', "application/json") == 0
            accepted = 'edgekit_fleet_summaries_total{outcome="accepted"}'
            mismatch = 'edgekit_fleet_rejected_total{kind="topic_mismatch"}'
            wait_until(lambda: _metric(base, accepted) == 2 and _metric(base, mismatch) == 1, 30,
                       "two stored windows and the mismatch counted")
            wait_until(lambda: deployment_topic(FLEET, "dev2") in dev2.received, 10, "dev2's deployment")
            time.sleep(1.0)  # time for anything the broker wrongly let through to arrive
            assert _metric(base, accepted) == 2 and _metric(base, mismatch) == 1
            devices = {d["device"]: d for d in json.loads(_get(f"{base}/api/devices"))["devices"]}
            assert sorted(devices) == ["dev1", "dev2"] and devices["dev2"]["state"] != "offline"
            # The watcher saw dev2's topics carry only what dev2 (and the service) sent.
            assert watcher.received.count(summary_topic(FLEET, "dev2")) == 1
            assert status_topic(FLEET, "dev2") not in watcher.received
            assert dev1.received == []  # dev1's subscription to dev2's deployment delivers nothing
        finally:
            for c in clients:
                c.close()


def test_an_unenrolled_client_cannot_connect(pki: Any, tmp_path: Path) -> None:
    ca, ids, broker = pki
    assert connects(broker, ids["dev1"])
    assert not connects(broker, None, ca=ca.cert_path)  # no client certificate
    foreign = make_pki(tmp_path / "foreign")  # a certificate from another CA, also trusting our broker's CA
    assert not connects(broker, Identity(ca.cert_path, foreign["client"], foreign["client_key"]))
    # Another CA minting the id of an enrolled device: its certificate names dev1 but proves nothing.
    rogue = FleetCA(tmp_path / "rogue").issue("dev1", tmp_path / "rogue-dev1")
    assert not connects(broker, Identity(ca.cert_path, rogue.cert, rogue.key))


def test_a_revoked_device_cannot_reconnect(pki: Any, tmp_path: Path) -> None:
    ca, ids, broker = pki
    assert connects(broker, ids["dev1"]) and connects(broker, ids["dev2"])
    out = run_cli("edge_kit", "fleet", "revoke", "dev1", "--ca", str(ca.folder), "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.json()["revoked_serials"]) == 1
    # The broker reads the CRL when it (re)loads its configuration.
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and connects(broker, ids["dev1"]):
        time.sleep(0.5)
    assert not connects(broker, ids["dev1"])
    assert connects(broker, ids["dev2"])  # the others are unaffected
    broker.stop()  # and a restart keeps it out
    broker.start()
    assert not connects(broker, ids["dev1"]) and connects(broker, ids["dev2"])
    # Enrolling the same id again issues a new certificate that works.
    again = ca.issue("dev1", tmp_path / "dev1-again")
    broker.proc.send_signal(signal.SIGHUP)
    assert connects(broker, Identity(again.ca, again.cert, again.key))


def test_edge_agent_run_connects_with_its_enrolled_identity(pki: Any, tmp_path: Path) -> None:
    _, ids, broker = pki
    watcher = Client(broker, "service-watch", ids["service"])
    assert watcher.wait_connected()
    watcher.client.subscribe(f"edgekit/{FLEET}/#", qos=1)
    wait_until(lambda: watcher.granted, 10, "the watcher's subscription")
    bundle = make_agent_bundle(tmp_path / "bundle")
    me = ids["dev1"]
    config = (f'[mqtt]\nca_certs = "{me.ca}"\ncertfile = "{me.cert}"\nkeyfile = "{me.key}"\n'
              "reconnect_min = 0.2\nreconnect_max = 1.0\n")
    agent = AgentProcess(tmp_path, "--bundle", str(bundle), "--broker", f"mqtts://127.0.0.1:{broker.port}",
                         "--device-id", "dev1", "--fleet", FLEET, "--spool", str(tmp_path / "spool.db"),
                         "--window-seconds", "1", config=config)
    try:
        agent.post("/predict", {"inputs": digits_like_inputs(3).tolist()})
        wait_until(lambda: agent.status()["connected"], 20, "the agent's TLS connection")
        wait_until(lambda: agent.status()["spool"]["acked"] >= 1, 20, "a window acknowledged by the broker")
        wait_until(lambda: summary_topic(FLEET, "dev1") in watcher.received, 10, "the agent's summary")
    finally:
        agent.stop()
        watcher.close()
    # The same agent under another device id: the broker refuses what it publishes (not its topics).
    agent = AgentProcess(tmp_path, "--bundle", str(bundle), "--broker", f"mqtts://127.0.0.1:{broker.port}",
                         "--device-id", "dev2", "--fleet", FLEET, "--spool", str(tmp_path / "spool2.db"),
                         "--window-seconds", "1", config=config)
    try:
        agent.post("/predict", {"inputs": digits_like_inputs(3).tolist()})
        wait_until(lambda: agent.status()["connected"], 20, "the agent's TLS connection")
        time.sleep(3.0)
        assert agent.status()["spool"]["acked"] == 0  # nothing it sent as dev2 was accepted
    finally:
        agent.stop()
    assert SERVICE_IDENTITY not in {"dev1", "dev2"}
