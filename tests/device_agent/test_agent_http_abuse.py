"""A real `edge-agent run --http` process keeps serving under abuse: announced-but-unsent bodies, JSON
nested past any parser's stack, absurd binary-extension header lengths. Raw sockets, so what is checked
is what a client on the network sees, and the agent's log shows no traceback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.device_agent.test_agent_http_limits import predict_body, read_response, request
from tests.helpers.mqtt import AgentProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]
INFER = "/v2/models/digits/infer"
# Long, so that a request held up by the idle sockets would wait for them to time out: that wait
# would be minutes, where a request that is not held up is answered in well under one.
IDLE_TIMEOUT = 120


@pytest.fixture(scope="module")
def agent(bundle_v1: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    work = tmp_path_factory.mktemp("abuse-agent")
    # No broker is needed to serve HTTP: the agent spools and keeps trying it.
    proc = AgentProcess(work, "--bundle", str(bundle_v1), "--broker", "mqtt://127.0.0.1:1", "--device-id", "d",
                        "--spool", str(work / "spool.db"), "--http-timeout", str(IDLE_TIMEOUT))
    try:
        yield proc
    finally:
        assert proc.stop() == 0


def _call(agent: AgentProcess, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(data)
        status, _, body = read_response(sock)
        return status, body


def test_sockets_announcing_bodies_at_the_limit_and_sending_nothing_block_no_one(agent: AgentProcess) -> None:
    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(4)]
    try:
        for sock in idle:  # 4 x 8 MiB announced: twice the whole body budget, and not a byte of it sent
            sock.sendall(request("POST", "/predict", headers={"Content-Length": str(8 * 1024 * 1024)}))
        time.sleep(0.3)
        started = time.monotonic()
        small = predict_body(1)
        large = predict_body(120)  # over 64 KiB: answered by the worker, under the shared body budget
        assert len(large) > 64 * 1024
        for body in (small, large, small):
            status, answer = _call(agent, request("POST", "/predict", body))
            assert status == 200, answer
        # Nobody waited for the idle sockets to be timed out (a generous bound, far from any speed claim).
        assert time.monotonic() - started < IDLE_TIMEOUT / 2
    finally:
        for sock in idle:
            sock.close()


def _one_line_4xx(status: int, body: bytes) -> str:
    assert 400 <= status < 500, (status, body[:200])
    message = json.loads(body)["error"]
    assert isinstance(message, str) and "\n" not in message and len(message) < 300
    return message


def test_json_nested_past_the_parsers_stack_is_a_400(agent: AgentProcess) -> None:
    deep = b'{"inputs": ' + b"[" * 1100 + b"1" + b"]" * 1100 + b"}"
    for path in ("/predict", "/labels"):
        assert "JSON" in _one_line_4xx(*_call(agent, request("POST", path, deep)))
    doc = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 1100 + b"]" * 1100
    assert "JSON" in _one_line_4xx(*_call(agent, request("POST", INFER, doc + b"}]}")))
    assert "Traceback" not in agent.log


def test_an_inference_header_length_of_5000_digits_is_a_400(agent: AgentProcess) -> None:
    body = b'{"inputs": []}'
    for value in ("9" * 5000, "1" + "0" * 19, "-1", "٣"):
        message = _one_line_4xx(*_call(agent, request("POST", INFER, body,
                                                      headers={"Inference-Header-Content-Length": value})))
        assert "Inference-Header-Content-Length" in message
    assert "Traceback" not in agent.log
    assert agent.status()["counters"]["bad_requests"] >= 4
