"""The fleet server's HTTP surface under hostile requests: CSRF, operator token, Host and
Origin checks, Content-Length and body limits, idle and half-sent connections, CSV injection, strict JSON."""

from __future__ import annotations

import http.client
import json
import math
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_kit.fleet.http_security import HttpSecurity
from edge_kit.fleet.server import FleetHttpLimits, alerts_csv, dumps, make_server, serve_in_thread
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from harness.fleetkit import OPERATOR_TOKEN

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def _request(base: str, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _raw(base: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (no client-side framing) and read the answer until the server closes."""
    url = urllib.parse.urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if len(out) > 1 << 20:
                break
        return out


@pytest.fixture
def marker_service(service: FleetService, tmp_path: Path) -> tuple[FleetService, Path]:
    """The service whose retraining command would create a file: proof of whether it ran."""
    marker = tmp_path / "retrain-ran"
    settings = parse_settings({"alerts": {"retrain_command": [
        sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"]}})
    service.alerts.settings = settings.alerts
    return service, marker


@pytest.fixture
def closed(service: FleetService) -> Iterator[str]:
    """A server as `fleet serve --token-file F` runs it: the token needed for reads too."""
    server = make_server(service, "127.0.0.1", 0, HttpSecurity(token=OPERATOR_TOKEN),
                         FleetHttpLimits(request_timeout=1.0, max_connections=32))
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _pending(service: FleetService) -> int:
    return int(next(a["id"] for a in service.storage.alerts() if a["state"] == "pending_approval"))


def test_cross_origin_form_post_cannot_approve_an_alert(http: str, marker_service: tuple[FleetService, Path]) -> None:
    service, marker = marker_service
    target = _pending(service)
    # What a page on another site can make a browser send: a form POST, no custom headers.
    form = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
    assert _request(http, "POST", f"/api/alerts/{target}/approve", b"", form)[0] == 403
    assert _request(http, "POST", f"/api/alerts/{target}/approve", b"by=x", form)[0] == 403
    # Even with the token (it never has it): a foreign Origin or a form content type is refused.
    assert _request(http, "POST", f"/api/alerts/{target}/approve", b"{}", {**form, **AUTH})[0] == 403
    no_origin_form = {"Content-Type": "text/plain", **AUTH}
    assert _request(http, "POST", f"/api/alerts/{target}/approve", b"{}", no_origin_form)[0] == 415
    assert _request(http, "POST", f"/api/alerts/{target}/dismiss", b"", {"Content-Type": "text/plain"})[0] == 401
    service.alerts.wait()
    assert not marker.exists(), "the retraining command ran"
    assert service.storage.alert(target)["state"] == "pending_approval"  # type: ignore[index]


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json"},  # no token
    {"Content-Type": "application/json", "Authorization": "Bearer wrong-token-wrong-token"},
    {"Content-Type": "application/json", "Authorization": f"Basic {OPERATOR_TOKEN}"},
    {"Authorization": f"Bearer {OPERATOR_TOKEN}"},  # no JSON content type
    {"Content-Type": "application/json", "Host": "attacker.example", **AUTH},  # DNS rebinding
])
def test_changes_need_token_json_and_an_allowed_host(http: str, marker_service: tuple[FleetService, Path],
                                                     headers: dict[str, str]) -> None:
    service, marker = marker_service
    target = _pending(service)
    status, _ = _request(http, "POST", f"/api/alerts/{target}/dismiss", b"{}", headers)
    assert status in (400, 401, 403, 415)
    assert service.storage.alert(target)["state"] == "pending_approval"  # type: ignore[index]
    assert not marker.exists()


def test_the_operator_with_the_token_can_approve(http: str, marker_service: tuple[FleetService, Path]) -> None:
    service, marker = marker_service
    target = _pending(service)
    same_origin = {"Content-Type": "application/json", "Origin": http, **AUTH}
    status, body = _request(http, "POST", f"/api/alerts/{target}/approve", b'{"by": "alice"}', same_origin)
    assert status == 200 and json.loads(body)["approved_by"] == "alice"
    service.alerts.wait()
    assert marker.read_text() == "ran"


def test_reads_need_the_token_when_not_opened(closed: str) -> None:
    assert _request(closed, "GET", "/api/alerts")[0] == 401
    assert _request(closed, "GET", "/metrics")[0] == 401
    assert _request(closed, "GET", "/api/alerts", headers=AUTH)[0] == 200
    assert _request(closed, "GET", "/")[0] == 200  # the page itself: no data, so the operator can log in
    assert _request(closed, "GET", "/healthz")[0] == 200
    assert _request(closed, "GET", "/api/devices", headers={"Host": "rebound.example", **AUTH})[0] == 400


def test_bad_content_length_is_400_at_once(http: str) -> None:
    head = b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
           b"Authorization: Bearer " + OPERATOR_TOKEN.encode() + b"\r\n"
    for length in (b"-1", b"abc", b"1e3"):
        start = time.monotonic()
        answer = _raw(http, head + b"Content-Length: " + length + b"\r\n\r\n{}")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert time.monotonic() - start < 5  # answered, not waiting for a body that never ends
    assert _raw(http, head + b"\r\n").startswith(b"HTTP/1.1 400")  # no Content-Length at all
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert _raw(http, chunked).startswith(b"HTTP/1.1 400")
    over = _raw(http, head + b"Content-Length: 999999999\r\n\r\n{}")
    assert over.startswith(b"HTTP/1.1 413")


def test_idle_and_half_sent_connections_neither_stay_nor_block_healthz(closed: str) -> None:
    url = urllib.parse.urlsplit(closed)
    idle = [socket.create_connection((url.hostname, url.port)) for _ in range(80)]
    half = []
    for _ in range(20):
        s = socket.create_connection((url.hostname, url.port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # never finished
        half.append(s)
    try:
        assert _request(closed, "GET", "/healthz")[0] == 200  # 100 sockets over a cap of 32
        # The half-sent one is closed by the server after the request deadline (1 s here).
        half[-1].settimeout(10)
        assert half[-1].recv(100) == b""
    finally:
        for s in idle + half:
            s.close()


def test_csv_export_neutralises_formulas(service: FleetService) -> None:
    alerts = service.storage.alerts()[:1]
    alerts[0] = {**alerts[0], "summary": "=HYPERLINK(\"http://evil\")", "approved_by": "@SUM(1)", "scope": "+1",
                 "kind": "-2"}
    lines = alerts_csv(alerts).splitlines()
    assert "'=HYPERLINK" in lines[1] and "'@SUM(1)" in lines[1] and ",'+1," in lines[1] and ",'-2," in lines[1]


def test_answers_are_strict_json() -> None:
    import numpy as np

    text = dumps({"a": math.nan, "b": [math.inf, 1.5], "c": np.float64("nan"), "d": np.array([1.0, np.inf])})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"emitted {c}")) == {
        "a": None, "b": [None, 1.5], "c": None, "d": [1.0, None]}


def test_keep_alive_connections_have_nodelay(tmp_path: Path) -> None:
    # Headers and body leave in separate writes; without TCP_NODELAY a keep-alive client waits for its
    # delayed ACK (~40 ms) on every answer. Checked on the server's own sockets, not with a timer.
    import socket as socket_module

    from edge_kit.fleet.reference_index import ReferenceStore
    from edge_kit.fleet.storage import Storage

    svc = FleetService(Storage(f"sqlite:///{tmp_path}/f.db"), ReferenceStore([]), parse_settings({}))
    server = make_server(svc, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        for _ in range(3):  # one connection, several requests
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("connection") != "close"
            response.read()
        connections = list(server.uvicorn.server_state.connections)
        assert connections
        for c in connections:
            sock = c.transport.get_extra_info("socket")
            assert sock.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) == 1
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_operator_token_sources_and_bad_tokens(tmp_path: Path) -> None:
    from edge_kit.errors import UsageError
    from edge_kit.fleet.http_security import load_token

    f = tmp_path / "token"
    f.write_text(OPERATOR_TOKEN + "\n")
    assert load_token(str(f), {}) == OPERATOR_TOKEN
    assert load_token(None, {"EDGEKIT_FLEET_TOKEN": OPERATOR_TOKEN}) == OPERATOR_TOKEN
    assert load_token(None, {}) is None
    for bad in ("short", "has a space in it, long enough", "x" * 15):
        f.write_text(bad)
        with pytest.raises(UsageError) as exc:
            load_token(str(f), {})
        assert exc.value.exit_code == 2
    with pytest.raises(UsageError):
        load_token(str(tmp_path / "missing"), {})


def _one_line_error(status: int, body: bytes, expected: int) -> None:
    assert status == expected, (status, body[:300])
    message = json.loads(body)["error"]
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("alert_id", ["1" + "0" * 23, "9" * 19, "9" * 5000, "abc", "-1"])
def test_an_alert_id_the_database_cannot_hold_is_a_404(http: str, alert_id: str) -> None:
    headers = {"Content-Type": "application/json", **AUTH}
    for action in ("approve", "dismiss"):
        _one_line_error(*_request(http, "POST", f"/api/alerts/{alert_id}/{action}", b"{}", headers), 404)


@pytest.mark.parametrize("host", ["[::1]attacker.example", "[::1]:80attacker.example", "127.0.0.1 attacker.example",
                                  "user@127.0.0.1", "127.0.0.1:", "127.0.0.1:99999999", "[::1", "::1"])
def test_a_host_header_that_only_starts_like_an_allowed_host_is_a_400(http: str, host: str) -> None:
    _one_line_error(*_request(http, "GET", "/api/devices", headers={"Host": host}), 400)


def test_allowed_hosts_with_and_without_ports_still_pass(http: str) -> None:
    for host in ("127.0.0.1", "127.0.0.1:8080", "localhost:1", "[::1]", "[::1]:8080", "LOCALHOST"):
        assert _request(http, "GET", "/api/devices", headers={"Host": host})[0] == 200, host


@pytest.mark.parametrize("headers", [
    {"X-Long": "a" * 30 * 1024},  # one 30 KiB line, arriving in one read
    {f"X-Part-{i}": "b" * 4000 for i in range(5)},  # 20 KiB of headers, each line short
])
def test_a_request_head_over_the_limits_is_a_431(http: str, headers: dict[str, str]) -> None:
    _one_line_error(*_request(http, "GET", "/api/devices", headers=headers), 431)
    assert _request(http, "GET", "/api/devices", headers={"X-Fine": "c" * 4000})[0] == 200


def test_json_nested_past_the_parsers_stack_is_a_400(http: str) -> None:
    deep = b'{"device": ' + b"[" * 1100 + b"]" * 1100 + b"}"
    headers = {"Content-Type": "application/json", **AUTH}
    _one_line_error(*_request(http, "POST", "/api/labels", deep, headers), 400)


@pytest.mark.slow
def test_the_real_fleet_serve_refuses_abuse_with_one_line_4xx(tmp_path: Path, mosquitto, digits_bundle) -> None:
    """The same attacks against `edge-kit fleet serve` in its own process: 4xx each, no traceback logged."""
    import os
    import signal
    import subprocess

    from harness.processes import cli_env, free_port, wait_for_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "token"
    token_file.write_text(OPERATOR_TOKEN)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", mosquitto.url,
                                 "--db", f"sqlite:///{tmp_path / 'fleet.db'}", "--http", f"127.0.0.1:{port}",
                                 "--bundle", str(digits_bundle.path), "--token-file", str(token_file)],
                                env=cli_env(), stdout=out, stderr=out, start_new_session=True)
    try:
        wait_for_port(port, timeout=60)
        headers = {"Content-Type": "application/json", **AUTH}
        _one_line_error(*_request(base, "POST", f"/api/alerts/{10**23}/approve", b"{}", headers), 404)
        _one_line_error(*_request(base, "POST", f"/api/alerts/{'7' * 5000}/dismiss", b"{}", headers), 404)
        _one_line_error(*_request(base, "GET", "/api/devices", headers={"Host": "[::1]attacker.example", **AUTH}), 400)
        _one_line_error(*_request(base, "GET", "/api/devices", headers={"X-Long": "a" * 30 * 1024, **AUTH}), 431)
        deep = b'{"device": ' + b"[" * 1100 + b"]" * 1100 + b"}"
        _one_line_error(*_request(base, "POST", "/api/labels", deep, headers), 400)
        assert _request(base, "GET", "/api/devices", headers=AUTH)[0] == 200  # still serving
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    assert "Traceback" not in log.read_text(errors="replace")
