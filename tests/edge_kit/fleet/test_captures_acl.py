"""deploy/mosquitto.acl, as shipped, for capture requests: a real `fleet serve` connecting with the service's
enrolled identity publishes a capture request (retained) that the addressed device reads; another device can
neither read it nor publish a capture request of its own."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.uplink.wire import capture_topic
from edge_kit.fleet.identity import FleetCA, Issued
from harness.fleetkit import DigitsBundle
from harness.processes import REPO_ROOT, MosquittoBroker
from tests.edge_kit.fleet.captures_kit import FleetServe, call, operator
from tests.helpers.mqtt import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "capacl"
DEPLOYED = "/etc/mosquitto/edgekit/"


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[tuple[dict[str, Issued], MosquittoBroker]]:
    ca = FleetCA(tmp_path / "ca")
    ids = {name: ca.issue(name, tmp_path / name, role=role, hosts=hosts) for name, role, hosts in (
        ("dev1", "device", ()), ("dev2", "device", ()), ("service", "service", ()),
        ("broker", "broker", ("127.0.0.1",)))}
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = MosquittoBroker(workdir)
    acl = (REPO_ROOT / "deploy" / "mosquitto.acl").read_text()
    (workdir / "mosquitto.acl").write_text(acl.replace("edgekit/default/", f"edgekit/{FLEET}/"))
    conf = (REPO_ROOT / "deploy" / "mosquitto.conf").read_text()
    for name, path in {"broker.pem": ids["broker"].cert, "broker.key": ids["broker"].key, "ca.pem": ca.cert_path,
                       "crl.pem": ca.crl_path, "mosquitto.acl": workdir / "mosquitto.acl"}.items():
        conf = conf.replace(f"{DEPLOYED}{name}", str(path))
    conf = conf.replace("\nlistener 8883\n", f"\nlistener {broker.port} 127.0.0.1\n")
    conf = conf.replace("persistence_location /var/lib/mosquitto/\n", f"persistence_location {workdir}/\n")
    broker.config.write_text(("user root\n" if os.geteuid() == 0 else "") + conf)
    broker.start()
    try:
        yield ids, broker
    finally:
        broker.stop()


class Device:
    def __init__(self, broker: MosquittoBroker, who: Issued, name: str) -> None:
        self.received: dict[str, dict[str, Any]] = {}
        self.acks: dict[int, int] = {}
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(who.ca), certfile=str(who.cert), keyfile=str(who.key))
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.on_message = lambda c, u, m: self.received.__setitem__(m.topic, json.loads(m.payload))
        self.client.on_publish = lambda c, u, mid, reason, p: self.acks.__setitem__(mid, reason.value)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def publish(self, topic: str) -> int:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        info = self.client.publish(topic, b"{}", qos=1, properties=props)
        return int(wait_until(lambda: self.acks.get(info.mid), 10, "the PUBACK"))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_only_the_addressed_device_reads_its_capture_requests(
        tmp_path: Path, deployed: tuple[dict[str, Issued], MosquittoBroker], digits_bundle: DigitsBundle) -> None:
    ids, broker = deployed
    service = ids["service"]
    server = FleetServe(tmp_path, f"mqtts://127.0.0.1:{broker.port}", digits_bundle.path.parent,
                        "--mqtt-ca-certs", str(service.ca), "--mqtt-certfile", str(service.cert),
                        "--mqtt-keyfile", str(service.key), fleet=FLEET)
    devices: list[Device] = []
    try:
        wait_until(lambda: call(server.url + "/healthz")[0] == 200, 90, "fleet serve connected under the ACL")
        status, sent = call(server.url + "/api/devices/dev2/capture-request", "POST",
                            {"samples": 40, "reason": "acl"}, operator())
        assert status == 201
        dev1, dev2 = Device(broker, ids["dev1"], "dev1"), Device(broker, ids["dev2"], "dev2")
        devices += [dev1, dev2]
        dev2.client.subscribe(capture_topic(FLEET, "dev2"), qos=1)
        dev1.client.subscribe(capture_topic(FLEET, "dev2"), qos=1)  # another device's requests
        assert wait_until(lambda: dev2.received.get(capture_topic(FLEET, "dev2")), 20, "dev2's request") == sent
        assert dev1.publish(capture_topic(FLEET, "dev1")) == 135  # a device cannot ask itself (or others)
        assert dev1.received == {}
    finally:
        for d in devices:
            d.close()
        server.stop()
