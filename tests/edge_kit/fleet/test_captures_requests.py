"""Capture requests: `edge-kit fleet capture-request` against a real `fleet serve` publishes a retained QoS 1
message on the device's `capture` topic of a real Mosquitto, which a subscriber that connects later still
receives, also after the broker restarted with its persistence deleted (the fleet republishes what its
database says on reconnect); an approved alert asks the devices it names when `request_on_alert` is set."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from device_agent.uplink.wire import capture_topic
from edge_kit.fleet.captures.requests import CaptureRequests
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import make_bundle
from harness.processes import MosquittoBroker, run_cli
from tests.edge_kit.fleet.captures_kit import FleetServe, call, operator
from tests.helpers.mqtt import wait_until

FLEET = "capreq"


class Subscriber:
    """A fresh MQTT client on every device's capture topic: (payload, retained) per device."""

    def __init__(self, port: int, name: str) -> None:
        self.got: dict[str, tuple[dict[str, Any], bool]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(capture_topic(FLEET), qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got[msg.topic.split("/")[2]] = (json.loads(msg.payload), bool(msg.retain))

    def latest(self, device: str) -> tuple[dict[str, Any], bool] | None:
        with self.lock:
            return self.got.get(device)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.integration
@pytest.mark.slow
def test_a_capture_request_is_retained_and_republished_after_a_broker_restart(tmp_path: Path) -> None:
    (tmp_path / "bundles").mkdir()
    (tmp_path / "broker").mkdir()
    bundle = make_bundle(tmp_path / "bundles")
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    server = FleetServe(tmp_path, broker.url, bundle.path.parent, fleet=FLEET)
    subscribers: list[Subscriber] = []
    try:
        wait_until(lambda: call(server.url + "/healthz")[0] == 200, 60, "fleet ready (publishers connected)")
        out = run_cli("edge_kit", "fleet", "capture-request", "dev4", "--samples", "500", "--reason",
                      "data drift alert 7", "--server", server.url, "--token-file", str(server.token), "--json",
                      timeout=120)
        assert out.returncode == 0, out.stderr
        sent = out.json()
        sent.pop("ok", None)  # the CLI's --json envelope, not part of the message
        assert {k: sent[k] for k in ("schema", "fleet", "device", "samples", "reason")} == {
            "schema": "edgekit.capture_request/1", "fleet": FLEET, "device": "dev4", "samples": 500,
            "reason": "data drift alert 7"}
        assert len(sent["request"]) == 32 and sent["created"] > 0
        plain = run_cli("edge_kit", "fleet", "capture-request", "dev5", "--samples", "3", "--server", server.url,
                        "--token-file", str(server.token), timeout=120)
        assert plain.returncode == 0 and "dev5" in plain.stdout and "capture request" in plain.stdout

        later = Subscriber(broker.port, "late-subscriber")  # connects after the publish: retained
        subscribers.append(later)
        got = wait_until(lambda: later.latest("dev4"), 30, "the retained request")
        assert got == (sent, True)

        # Refused requests: never stored, never published.
        for body in ({"samples": 0}, {"samples": 100_001}, {"samples": "5"}, {"samples": 5, "extra": 1},
                     {"samples": 5, "reason": 7}):
            assert call(server.url + "/api/devices/dev6/capture-request", "POST", body, operator())[0] == 400
        assert call(server.url + "/api/devices/dev%2B/capture-request", "POST", {"samples": 5}, operator())[0] == 400
        bad = run_cli("edge_kit", "fleet", "capture-request", "dev6", "--samples", "0", "--server", server.url,
                      "--token-file", str(server.token), "--json", timeout=120)
        assert bad.returncode == 2

        # The broker loses everything it held; the fleet republishes on reconnect.
        broker.stop()
        for f in (tmp_path / "broker").glob("*.db"):
            f.unlink()
        broker.start()
        fresh = Subscriber(broker.port, "after-restart")
        subscribers.append(fresh)
        got = wait_until(lambda: fresh.latest("dev4"), 90, "the request republished after the broker restart")
        assert got[0] == sent  # live or retained, depending on who reconnected first
        last = Subscriber(broker.port, "after-republish")
        subscribers.append(last)
        assert wait_until(lambda: last.latest("dev4"), 30, "the retained request again") == (sent, True)
        assert fresh.latest("dev6") is None
    finally:
        for s in subscribers:
            s.close()
        server.stop()
        broker.stop()


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, messages: Any) -> None:
        self.sent += list(messages)


def test_an_approved_alert_asks_the_devices_it_names(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    settings = parse_settings({"captures": {"request_on_alert": 50}})
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    try:
        service = FleetService(storage, ReferenceStore([bundle.path]), settings)
        requests = CaptureRequests(storage, FLEET)
        requests.publisher = recorder = Recorder()
        service.enable_captures(None, requests)
        alert_id, _ = service.alerts.raise_alert(bundle.sha256, "device:dev7", "data_drift", "dev7 drifted",
                                                 {"device": "dev7", "channels": ["in.mean"]})
        fleet_id, _ = service.alerts.raise_alert(bundle.sha256, "fleet", "data_drift", "fleet drifted", {},
                                                 support=["dev8", "dev9"])
        assert recorder.sent == [] and requests.latest() == []  # raised, not approved: nothing asked
        service.alerts.approve(alert_id)
        assert [(m["device"], m["samples"], m["reason"]) for m in requests.latest()] == [
            ("dev7", 50, f"data drift alert {alert_id}")]
        assert recorder.sent == [(capture_topic(FLEET, "dev7"), recorder.sent[0][1])]
        service.alerts.approve(fleet_id)
        assert sorted(m["device"] for m in requests.latest()) == ["dev7", "dev8", "dev9"]
        assert len(requests.messages()) == 3  # what a reconnect republishes: one per device
    finally:
        storage.close()
