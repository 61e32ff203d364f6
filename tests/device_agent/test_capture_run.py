"""Field capture in a real `edge-agent run` (integration: a real Mosquitto, a local HTTP server standing in
for the fleet's device routes): a retained capture request published before the agent starts is
honoured once, the rows predicted over HTTP arrive at the fleet with their labels, records spooled while
the fleet was down survive a kill -9 of the agent and arrive after its restart, and an agent without
`[capture]` creates no capture spool and sends nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from device_agent.capture.request import CaptureRequest, encode_capture_request
from device_agent.uplink.wire import capture_topic
from harness.bundles import digits_like_inputs
from harness.processes import MosquittoBroker
from tests.helpers.fleet_double import FleetDouble
from tests.helpers.mqtt import AgentProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET, DEVICE = "f1", "cap-1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    (tmp_path / "broker").mkdir()
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def publish_request(broker: MosquittoBroker, request: CaptureRequest) -> None:
    """As the fleet does: retained, QoS 1, waiting for the broker's PUBACK."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-{time.time_ns()}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(capture_topic(FLEET, DEVICE), encode_capture_request(request), qos=1,
                       retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def start_agent(tmp_path: Path, bundle: Path, broker: MosquittoBroker, capture: str) -> AgentProcess:
    return AgentProcess(tmp_path, "--bundle", str(bundle), "--broker", broker.url, "--device-id", DEVICE,
                        "--fleet", FLEET, "--spool", str(tmp_path / "spool.db"), "--window-seconds", "2",
                        config=capture)


def capture_config(tmp_path: Path, fleet: FleetDouble, **keys: Any) -> str:
    (tmp_path / "upload.token").write_text("tok-run\n")
    lines = {"enabled": "true", "upload_url": f'"{fleet.url}"', "token_file": f'"{tmp_path / "upload.token"}"',
             "state_dir": f'"{tmp_path / "capture"}"', "upload_interval": "0.2", **keys}
    return "[capture]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())


def rows(n: int, seed: int) -> list[Any]:
    return digits_like_inputs(n, seed=seed).tolist()


def test_a_real_agent_honours_a_retained_request_and_uploads_labelled_rows(
        tmp_path: Path, bundle_v1: Path, broker: MosquittoBroker, fleet: FleetDouble) -> None:
    publish_request(broker, CaptureRequest("req-r1", FLEET, DEVICE, 5, time.time(), "drift alert 1"))
    agent = start_agent(tmp_path, bundle_v1, broker,
                        capture_config(tmp_path, fleet, fraction="0.0", fleet_requests="true"))
    try:
        wait_until(lambda: agent.status()["capture"]["requested_remaining"] == 5, 20, "the retained request")
        agent.post("/predict", {"inputs": rows(3, 1), "request_id": "A"})
        agent.post("/predict", {"inputs": rows(4, 2), "request_id": "B"})
        agent.post("/predict", {"inputs": rows(4, 3), "request_id": "C"})  # the request is used up
        agent.post("/labels", {"labels": ["1", "2", "3"], "request_id": "A"})
        agent.post("/labels", {"labels": ["4", "5", "6", "7"], "request_id": "B"})

        def labelled() -> dict[tuple[str, int], str | None]:
            return {(r["request_id"], r["row"]): fleet.labels.get(i, r["label"]) for i, r in fleet.stored.items()}

        wait_until(lambda: len(fleet.stored) == 5 and all(labelled().values()), 30, "5 labelled records")
        assert labelled() == {("A", 0): "1", ("A", 1): "2", ("A", 2): "3", ("B", 0): "4", ("B", 1): "5"}
        status = agent.status()["capture"]
        assert status["requests_honoured"] == 1 and status["captured"] == 5 and status["uploaded"] == 5
        headers = fleet.requests[0][1]
        assert headers["X-Edgekit-Device"] == DEVICE and headers["Authorization"] == "Device tok-run"
    finally:
        assert agent.stop() == 0
    # A restart gets the same retained request again: already honoured, nothing more captured.
    again = start_agent(tmp_path, bundle_v1, broker,
                        capture_config(tmp_path, fleet, fraction="0.0", fleet_requests="true"))
    try:
        wait_until(lambda: again.status()["capture"]["requests"]["repeated"] == 1, 20, "the request again")
        again.post("/predict", {"inputs": rows(4, 4), "request_id": "D"})
        assert again.status()["capture"]["captured"] == 5 and again.status()["capture"]["requested_remaining"] == 0
    finally:
        again.stop()


def test_records_spooled_while_the_fleet_is_down_survive_kill_9(
        tmp_path: Path, bundle_v1: Path, broker: MosquittoBroker, fleet: FleetDouble) -> None:
    fleet.script.extend([(503, {"error": "down"})] * 1000)
    agent = start_agent(tmp_path, bundle_v1, broker, capture_config(tmp_path, fleet, fraction="1.0"))
    try:
        for seed in range(3):
            agent.post("/predict", {"inputs": rows(4, seed), "request_id": f"k{seed}"})
        assert agent.status()["capture"]["pending_records"] == 12  # on disk before each answer came
        wait_until(lambda: agent.status()["capture"]["last_upload_error"], 20, "a refused upload")
    finally:
        agent.kill9()
    fleet.script.clear()
    restarted = start_agent(tmp_path, bundle_v1, broker, capture_config(tmp_path, fleet, fraction="1.0"))
    try:
        wait_until(lambda: len(fleet.stored) == 12, 30, "the 12 records after the restart")
        assert sorted((r["request_id"], r["row"]) for r in fleet.stored.values()) == sorted(
            (f"k{s}", r) for s in range(3) for r in range(4))
        assert restarted.status()["capture"]["captured"] == 12  # counters continue across the kill
    finally:
        restarted.stop()


def test_a_real_agent_without_capture_creates_and_sends_nothing(
        tmp_path: Path, bundle_v1: Path, broker: MosquittoBroker, fleet: FleetDouble) -> None:
    config = capture_config(tmp_path, fleet, enabled="false", fraction="1.0")
    agent = start_agent(tmp_path, bundle_v1, broker, config)
    try:
        for seed in range(5):
            agent.post("/predict", {"inputs": rows(4, seed), "request_id": f"n{seed}"})
        agent.post("/labels", {"labels": ["1"] * 4, "request_id": "n0"})
        time.sleep(1.0)  # five upload intervals, had capture been on
        assert "capture" not in agent.status()
    finally:
        assert agent.stop() == 0
    assert not (tmp_path / "capture").exists() and fleet.requests == []
