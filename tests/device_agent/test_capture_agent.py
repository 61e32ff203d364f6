"""Capture inside a real `Agent` (a tiny signed bundle built in code): an agent without `[capture]` enabled
creates nothing and sends nothing; with it, predicted rows are captured with the request, window,
model and input the model received, labels by request id land in the records (as class names) or,
after the upload, as label updates; fleet requests arrive over the capture topic."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.capture.capture import start_capture
from device_agent.capture.config import CaptureSettings
from device_agent.capture.request import CaptureRequest, encode_capture_request
from device_agent.settings import load_settings
from device_agent.uplink.transport import MemoryPublisher
from device_agent.uplink.wire import capture_topic
from harness.bundles import digits_like_inputs
from tests.helpers.fleet_double import FleetDouble


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def settings_for(tmp_path: Path, fleet: FleetDouble, **changes: Any) -> CaptureSettings:
    token = tmp_path / "upload.token"
    token.write_text("tok\n")
    base: dict[str, Any] = {"enabled": True, "fraction": 1.0, "upload_url": fleet.url, "token_file": token,
                            "state_dir": tmp_path / "capture", "upload_interval": 0.05}
    return CaptureSettings(**{**base, **changes})


def test_an_agent_without_capture_enabled_creates_nothing_and_sends_nothing(
        tmp_path: Path, bundle_v1: Path, fleet: FleetDouble) -> None:
    (tmp_path / "upload.token").write_text("tok\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'[capture]\nenabled = false\nfraction = 1.0\nupload_url = "{fleet.url}"\n'
                      f'token_file = "upload.token"\nstate_dir = "capture"\nupload_interval = 0.05\n')
    settings = load_settings(config)
    link = MemoryPublisher()
    agent = Agent(bundle_v1, fleet="demo", device_id="dev-1")
    assert start_capture(agent, link, settings.capture) is None
    for i in range(50):
        agent.predict(digits_like_inputs(8, seed=i), request_id=f"r{i}")
    agent.feed_labels(["1"] * 8, request_id="r3")
    time.sleep(0.3)  # several upload intervals, had anything been started
    assert agent.capture is None and "capture" not in agent.status()
    assert link.subscriptions == {}
    agent.stop()
    assert not (tmp_path / "capture").exists() and not list(tmp_path.rglob("captures.db*"))
    assert fleet.requests == []


def test_captured_rows_carry_request_window_model_input_and_their_labels(
        tmp_path: Path, bundle_v1: Path, fleet: FleetDouble) -> None:
    agent = Agent(bundle_v1, fleet="demo", device_id="dev-1")
    capture = start_capture(agent, None, settings_for(tmp_path, fleet, upload_interval=3600.0), seed=0)
    assert capture is not None and agent.capture is capture
    x = digits_like_inputs(5, seed=3)
    result = agent.predict(x, request_id="req-A")
    agent.feed_labels([3, "4", np.int64(5), "6", 7], request_id="req-A")  # indices or names: stored as names
    agent.predict(digits_like_inputs(2, seed=4))  # no request id: captured, never labelled
    assert capture.uploader is not None and capture.uploader.upload_round()
    records = sorted(fleet.stored.values(), key=lambda r: (r["request_id"] is None, r["row"]))
    assert len(records) == 7
    window_start = agent._monitor.summary.window_start
    for row, record in enumerate(records[:5]):
        assert record["request_id"] == "req-A" and record["row"] == row
        assert record["label"] == ["3", "4", "5", "6", "7"][row]
        assert record["window_start"] == window_start
        assert record["model_sha256"] == agent.model.runtime.info.sha256
        data = np.frombuffer(base64.b64decode(record["input"]["data"]), dtype="<f4").reshape(record["input"]["shape"])
        assert np.array_equal(data, x[row])  # the raw row the model received, no batch dimension
        assert np.allclose(record["output"], result.outputs[row]) and record["predicted"] == result.classes[row]
    assert [(r["request_id"], r["label"]) for r in records[5:]] == [(None, None), (None, None)]
    status = agent.status()["capture"]
    assert (status["captured"], status["uploaded"], status["pending_records"]) == (7, 7, 0)
    agent.stop()


def test_a_label_arriving_after_the_upload_becomes_a_label_update(
        tmp_path: Path, bundle_v1: Path, fleet: FleetDouble) -> None:
    agent = Agent(bundle_v1, fleet="demo", device_id="dev-1")
    capture = start_capture(agent, None, settings_for(tmp_path, fleet), seed=0)
    assert capture is not None
    agent.predict(digits_like_inputs(3, seed=5), request_id="req-B")
    wait_for(lambda: len(fleet.stored) == 3, "the upload")
    assert all(r["label"] is None for r in fleet.stored.values())
    agent.feed_labels(["1", "2", "9"], request_id="req-B")
    wait_for(lambda: len(fleet.labels) == 3, "the label update")
    assert sorted((fleet.stored[i]["row"], label) for i, label in fleet.labels.items()) == [(0, "1"), (1, "2"),
                                                                                           (2, "9")]
    status = agent.stop()["capture"]
    assert status["labels_sent"] == 3 and status["pending_labels"] == 0


def test_a_fleet_request_on_the_capture_topic_captures_the_next_rows(
        tmp_path: Path, bundle_v1: Path, fleet: FleetDouble) -> None:
    link = MemoryPublisher()
    agent = Agent(bundle_v1, fleet="demo", device_id="dev-1")
    capture = start_capture(agent, link, settings_for(tmp_path, fleet, fraction=0.0, fleet_requests=True,
                                                      upload_interval=3600.0), seed=0)
    assert capture is not None
    topic = capture_topic("demo", "dev-1")
    assert list(link.subscriptions) == [topic]
    agent.predict(digits_like_inputs(4, seed=1))
    assert agent.status()["capture"]["captured"] == 0  # fraction 0
    link.deliver(topic, encode_capture_request(CaptureRequest("req-7", "demo", "dev-1", 6, 1.0, "drift")))
    agent.predict(digits_like_inputs(4, seed=2))
    agent.predict(digits_like_inputs(4, seed=3))
    link.deliver(topic, encode_capture_request(CaptureRequest("req-7", "demo", "dev-1", 6, 1.0, "drift")))
    agent.predict(digits_like_inputs(4, seed=4))
    status = agent.status()["capture"]
    assert status["captured"] == 6 and status["requests_honoured"] == 1 and status["requests"]["repeated"] == 1
    agent.stop()


def test_after_a_hot_swap_records_name_the_new_model(
        tmp_path: Path, bundle_v1: Path, bundle_v2: Path, fleet: FleetDouble) -> None:
    agent = Agent(bundle_v1, fleet="demo", device_id="dev-1")
    capture = start_capture(agent, None, settings_for(tmp_path, fleet, upload_interval=3600.0), seed=0)
    assert capture is not None and capture.uploader is not None
    agent.predict(digits_like_inputs(1, seed=1))
    old = agent.model.runtime.info.sha256
    agent.update(bundle_v2)
    agent.predict(digits_like_inputs(1, seed=2))
    capture.uploader.upload_round()
    shas = sorted(r["model_sha256"] for r in fleet.stored.values())
    assert shas == sorted([old, agent.model.runtime.info.sha256]) and shas[0] != shas[1]
    agent.stop()
