"""Property-based tests of the agent's HTTP request handling: no input crashes the
server or escapes as an unexpected exception. Bounded (max_examples, deadline) to keep `make test` fast."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.agent import Agent
from device_agent.http.protocol import MAX_HEAD_BYTES, HttpError, HttpLimits, Request, parse_head
from device_agent.http.routes import Routes
from device_agent.http.server import AgentHTTPServer

MAX_BODY = 4096
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_header_names = st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding", "Connection", "Expect",
                                 "Host", "X-Request-Id", "Content-Type", "Inference-Header-Content-Length", "X y",
                                 " Content-Length", "Content-Length ", ""])
_header_values = st.one_of(st.sampled_from(["0", "-1", "12", "1e3", "+5", " 7 ", "chunked", "close", "keep-alive",
                                            "100-continue", "99999999999999999999", "٣"]),
                           st.text(max_size=20))
_heads = st.builds(
    lambda method, target, version, headers, tail: (
        f"{method} {target} {version}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in headers) + "\r\n"
    ).encode("utf-8", "surrogatepass") + tail,
    st.sampled_from(["GET", "POST", "PUT", "get", "", "P OST", "\x00"]),
    st.one_of(st.sampled_from(["/predict", "/v2/models/digits/infer", "/healthz?x=1", "*", "", "/a b"]),
              st.text(max_size=30)),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", ""]),
    st.lists(st.tuples(_header_names, _header_values), max_size=6),
    st.binary(max_size=40),
)


def _check(buf: bytes) -> None:
    try:
        parsed = parse_head(buf, MAX_BODY)
    except HttpError as exc:
        assert 400 <= exc.status < 600 and str(exc)
        return
    if parsed is None:  # incomplete: only while no terminator fits in the head limit
        assert len(buf) <= MAX_HEAD_BYTES + 1024
        return
    request, used = parsed
    assert isinstance(request, Request) and 0 < used <= len(buf)
    assert 0 <= request.content_length <= MAX_BODY
    assert request.path.startswith("/") and request.version in ("HTTP/1.1", "HTTP/1.0")


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_give_an_http_error(buf: bytes) -> None:
    _check(buf)


@FAST
@given(_heads)
def test_request_like_heads_parse_or_give_an_http_error(buf: bytes) -> None:
    _check(buf)


def test_a_head_without_end_is_refused_at_the_head_limit() -> None:
    with pytest.raises(HttpError) as exc:
        parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES, MAX_BODY)
    assert exc.value.status == 431


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Routes:
    from harness.bundles import make_bundle

    bundle = make_bundle(tmp_path_factory.mktemp("fuzz"), seed=0, version="1.0.0")
    return Routes(Agent(bundle, window_seconds=60), HttpLimits(max_samples=64))


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=30,
)
_tensor = st.fixed_dictionaries(
    {}, optional={"name": st.sampled_from(["input", "x", 3]), "datatype": st.sampled_from(["FP32", "FP64", "INT8", 1]),
                  "shape": st.one_of(st.lists(st.integers(-2, 70), max_size=5), _json_values),
                  "data": st.one_of(st.lists(st.floats(width=32), max_size=70), _json_values),
                  "parameters": st.one_of(st.fixed_dictionaries({"binary_data_size": st.integers(-5, 300)}),
                                          _json_values)})
_infer_docs = st.fixed_dictionaries({}, optional={
    "inputs": st.one_of(st.lists(_tensor, max_size=2), _json_values), "id": _json_values,
    "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "x"])}), max_size=2),
                         _json_values),
    "parameters": _json_values,
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["/predict", "/labels", "/v2/models/digits/infer", "/v2/models/digits/versions/1.0.0/infer",
                        "/v2/models/x/infer", "/v2", "/v2/models/digits", "/nope"]),
       st.sampled_from(["POST", "GET", "DELETE"]),
       st.one_of(_infer_docs.map(json.dumps), _json_values.map(json.dumps),
                 st.fixed_dictionaries({"inputs": _json_values, "labels": _json_values,
                                        "request_id": _json_values}).map(json.dumps)).map(str.encode)
       | st.binary(max_size=200),
       st.sampled_from(["", "0", "5", "30", "x"]),
       st.sampled_from(["application/json", "application/x-npy"]))
def test_no_body_makes_a_route_fail_unexpectedly(routes: Routes, path: str, method: str, body: bytes,
                                                 header_length: str, content_type: str) -> None:
    headers = {"content-type": content_type}
    if header_length:
        headers["inference-header-content-length"] = header_length
    request = Request(method, path, "", "HTTP/1.1", headers, len(body), True, False, body)
    response = routes.handle(request)  # never raises
    assert response.status in (200, 400, 404, 405, 413, 415), response.body[:300]
    doc = json.loads(response.body) if response.content_type == "application/json" else None
    if response.status != 200:
        assert isinstance(doc, dict) and isinstance(doc["error"], str)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentHTTPServer]:
    from harness.bundles import make_bundle

    bundle = make_bundle(tmp_path_factory.mktemp("fuzz-live"), seed=0, version="1.0.0")
    server = AgentHTTPServer(("127.0.0.1", 0), Agent(bundle, window_seconds=60), HttpLimits(request_timeout=0.5))
    server.start()
    yield server
    server.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_heads, st.binary(max_size=200)))
def test_the_running_server_survives_any_bytes(live: AgentHTTPServer, data: bytes) -> None:
    with socket.create_connection(live.server_address[:2], timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):  # the server answers and/or closes (timeout 0.5 s), never hangs
            answer += chunk
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    assert b" 500 " not in answer.split(b"\r\n", 1)[0]
    with socket.create_connection(live.server_address[:2], timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
