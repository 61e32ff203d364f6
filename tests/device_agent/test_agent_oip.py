"""The Open Inference Protocol v2, spoken by the official `tritonclient[http]` client (unchanged) to a real
`edge-agent run` process that publishes its summaries to a real Mosquitto."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from device_agent.agent import Agent
from harness.bundles import digits_like_inputs
from harness.processes import MosquittoBroker
from tests.helpers.mqtt import AgentProcess, Subscriber, wait_until

pytestmark = pytest.mark.integration


def _infer(client: httpclient.InferenceServerClient, x: np.ndarray, *, binary: bool,
           request_id: str = "") -> np.ndarray:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("digits", [tensor], outputs=[out], request_id=request_id)
    response = result.get_response()
    assert response["model_name"] == "digits" and response["model_version"] == "1.0.0"
    assert ("parameters" in response["outputs"][0]) is binary  # binary_data_size only when asked
    logits: np.ndarray = result.as_numpy("logits")
    return logits


def test_tritonclient_against_a_running_agent(mosquitto: MosquittoBroker, bundle_v1: Path, tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, "--bundle", str(bundle_v1), "--broker", mosquitto.url, "--device-id", "oip-1",
                         "--fleet", "test", "--spool", str(tmp_path / "spool.db"), "--window-seconds", "1",
                         config="[mqtt]\nreconnect_min = 0.2\nreconnect_max = 1.0\n")
    reference = Agent(bundle_v1)  # the embedded API on the same bundle
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{agent.port}")
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "1.0.0")
        assert not client.is_model_ready("digits", "9.9.9") and not client.is_model_ready("cats")
        server = client.get_server_metadata()
        assert server["name"] == "edge-agent" and "binary_tensor_data" in server["extensions"]
        meta = client.get_model_metadata("digits")
        assert meta["name"] == "digits" and meta["versions"] == ["1.0.0"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get_model_metadata("digits", "1.0.0")["versions"] == ["1.0.0"]

        x = digits_like_inputs(5, seed=21).astype(np.float32)
        expected = reference.predict(x).outputs
        as_json = _infer(client, x, binary=False)
        as_binary = _infer(client, x, binary=True, request_id="req-1")
        assert as_binary.dtype == np.float32 and as_binary.shape == (5, 10)
        # Same arithmetic as the embedded API: JSON carries float32 values exactly, binary is bit-exact.
        np.testing.assert_array_equal(as_binary, expected)
        np.testing.assert_array_equal(as_json, expected)
        one = _infer(client, x[:1], binary=True)
        np.testing.assert_array_equal(one, expected[:1])

        # The protocol's errors, counted as bad requests; the agent keeps serving.
        wrong_type = httpclient.InferInput("input", [1, 1, 8, 8], "FP64")
        wrong_type.set_data_from_numpy(x[:1].astype(np.float64))
        with pytest.raises(InferenceServerException, match="datatype"):
            client.infer("digits", [wrong_type])
        wrong_shape = httpclient.InferInput("input", [1, 3], "FP32")
        wrong_shape.set_data_from_numpy(np.ones((1, 3), np.float32))
        with pytest.raises(InferenceServerException, match="does not fit"):
            client.infer("digits", [wrong_shape])
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_metadata("cats")
        status = agent.status()
        assert status["counters"]["bad_requests"] == 2
        assert status["counters"]["predictions"] == 11 and status["counters"]["requests"] == 3

        # Ground truth for the inference sent with request id "req-1" comes back through /labels.
        assert agent.post("/labels", {"labels": [1] * 5, "request_id": "req-1"}) == {"counted": 5}

        # The summaries count these inferences like /predict ones.
        def total() -> int:
            return sum(p["n"] for p in sub.unique_windows().values() if p["device"] == "oip-1")

        wait_until(lambda: total() >= 11, 15, "summaries of the 11 inferences")
        assert total() == 11
        labelled = [p for p in sub.unique_windows().values() if p.get("labels")]
        assert sum(p["labels"]["n"] for p in labelled) == 5
    finally:
        assert agent.stop() == 0
        sub.close()


def test_binary_tensor_requests_are_checked_against_their_sizes(bundle_v1: Path, tmp_path: Path,
                                                                mosquitto: MosquittoBroker) -> None:
    agent = AgentProcess(tmp_path, "--bundle", str(bundle_v1), "--broker", mosquitto.url, "--device-id", "oip-2",
                         "--spool", str(tmp_path / "spool.db"))
    try:
        x = digits_like_inputs(2).astype("<f4")
        header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8],
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        cases = [
            (header, x.tobytes()[:-4], len(header)),  # 4 bytes short
            (header, x.tobytes(), len(header) + 1),  # header length points inside the tensor
            (header, x.tobytes(), 10**6),  # header length past the body
        ]
        for head, data, header_length in cases:
            with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
                body = head + data
                sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                             b"Inference-Header-Content-Length: " + str(header_length).encode() + b"\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                answer = b""
                while b"}" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert agent.status()["counters"]["bad_requests"] == len(cases)
        assert agent.status()["counters"]["predictions"] == 0
    finally:
        assert agent.stop() == 0
