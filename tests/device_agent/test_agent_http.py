"""The local HTTP API: JSON and .npy predictions, labels, health and status, clean 4xx for bad input."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.errors import UsageError
from device_agent.http.protocol import HttpLimits
from device_agent.http.server import AgentHTTPServer
from device_agent.uplink.wire import parse_host_port
from harness.bundles import digits_like_inputs


@pytest.fixture
def served(bundle_v1: Path) -> Iterator[tuple[Agent, str]]:
    agent = Agent(bundle_v1, window_seconds=60)
    server = AgentHTTPServer(("127.0.0.1", 0), agent)
    server.start()
    try:
        yield agent, server.url
    finally:
        server.stop()


def call(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_predict_json_and_npy_give_the_same_answer_as_the_python_api(served: tuple[Agent, str]) -> None:
    agent, url = served
    x = digits_like_inputs(3, seed=9)
    status, doc = call(f"{url}/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    direct = agent.predict(x)
    np.testing.assert_allclose(np.array(doc["outputs"]), direct.outputs, rtol=1e-5)
    assert doc["predictions"] == direct.labels and doc["model"]["version"] == "1.0.0"

    buf = io.BytesIO()
    np.save(buf, x)
    status, doc_npy = call(f"{url}/predict", buf.getvalue(), "application/x-npy")
    assert status == 200 and doc_npy["predictions"] == direct.labels

    # One sample without the batch dimension.
    status, one = call(f"{url}/predict", json.dumps({"inputs": x[0].tolist()}).encode())
    assert status == 200 and one["predictions"] == direct.labels[:1]


def test_bad_requests_get_400_and_are_counted(served: tuple[Agent, str]) -> None:
    agent, url = served
    for body, ctype, fragment in [
        (json.dumps({"inputs": [[1.0, 2.0]]}).encode(), "application/json", "does not fit"),
        (json.dumps({"inputs": [[float("nan")] * 64]}).encode(), "application/json", "NaN"),
        (b"{not json", "application/json", "not valid JSON"),
        (json.dumps({"x": 1}).encode(), "application/json", "inputs"),
        (b"garbage", "application/x-npy", ".npy"),
        (json.dumps({"inputs": [[1, [2]]]}).encode(), "application/json", "rectangular"),
    ]:
        status, doc = call(f"{url}/predict", body, ctype)
        assert status == 400, doc
        assert fragment in doc["error"]
    status, health = call(f"{url}/healthz")
    assert status == 200 and health["ok"]
    assert agent.status()["counters"]["bad_requests"] >= 5


def test_labels_status_and_unknown_routes(served: tuple[Agent, str]) -> None:
    agent, url = served
    _, doc = call(f"{url}/predict", json.dumps({"inputs": digits_like_inputs(2).tolist(), "request_id": "r9"}).encode())
    assert doc["request_id"] == "r9"
    status, counted = call(f"{url}/labels", json.dumps({"labels": doc["predictions"], "request_id": "r9"}).encode())
    assert status == 200 and counted == {"counted": 2}
    status, err = call(f"{url}/labels", json.dumps({"labels": ["banana"]}).encode())
    assert status == 400 and "banana" in err["error"]
    status, st = call(f"{url}/status")
    assert status == 200 and st["counters"]["labels"] == 2 and st["window"]["open_n"] == 2
    assert call(f"{url}/nope")[0] == 404
    closed = agent.close_window()
    assert closed is not None and closed.confusion is not None and int(np.trace(closed.confusion)) == 2


def test_listen_spec() -> None:
    assert parse_host_port("127.0.0.1:8081") == ("127.0.0.1", 8081)
    assert parse_host_port(":9000") == ("127.0.0.1", 9000)
    with pytest.raises(UsageError):
        parse_host_port("localhost")


def test_an_oversized_body_is_refused_without_reading_it(bundle_v1: Path) -> None:
    agent = Agent(bundle_v1, window_seconds=60)
    server = AgentHTTPServer(("127.0.0.1", 0), agent, HttpLimits(max_body_bytes=1000))
    server.start()
    try:
        status, doc = call(f"{server.url}/predict", json.dumps({"inputs": digits_like_inputs(8).tolist()}).encode())
        assert status == 413 and "limit" in doc["error"]
        assert call(f"{server.url}/healthz")[0] == 200
    finally:
        server.stop()
