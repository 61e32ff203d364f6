"""The agent's HTTP server against hostile or careless clients, over real sockets.

Each test talks to a real `AgentHTTPServer` on a loopback port with raw sockets, so what is checked
is what a client on the network sees: the status line, whether the connection is closed, and how
long the server waits. The same limits hold on the Open Inference Protocol routes (/v2/...).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.http.protocol import HttpLimits
from device_agent.http.server import AgentHTTPServer
from harness.bundles import digits_like_inputs
from tests.helpers.mqtt import wait_until

INFER = "/v2/models/digits/infer"


@pytest.fixture
def make_server(bundle_v1: Path) -> Iterator:
    servers: list[AgentHTTPServer] = []

    def _make(limits: HttpLimits | None = None, **agent_kw) -> tuple[Agent, AgentHTTPServer]:
        agent = Agent(bundle_v1, window_seconds=60, **agent_kw)
        server = AgentHTTPServer(("127.0.0.1", 0), agent, limits)
        server.start()
        servers.append(server)
        return agent, server

    yield _make
    for server in servers:
        server.stop()


def connect(server: AgentHTTPServer, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(server.server_address[:2], timeout=timeout)
    _unread.pop(id(sock), None)
    return sock


_unread: dict[int, bytes] = {}  # bytes received past the response read so far, by socket


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off a keep-alive socket (status, lower-case headers, body); raises on EOF."""
    data = _unread.pop(id(sock), b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        rest += chunk
    _unread[id(sock)] = rest[length:]
    return int(lines[0].split()[1]), headers, rest[:length]


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    hdrs = {"Host": "x", "Content-Type": "application/json", **(headers or {})}
    if body or method == "POST":
        hdrs.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode() + body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes (after at most one response) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def predict_body(n: int, seed: int = 0) -> bytes:
    return json.dumps({"inputs": digits_like_inputs(n, seed=seed).tolist()}).encode()


def infer_body(n: int) -> bytes:
    x = digits_like_inputs(n)
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()


@pytest.mark.parametrize("path", ["/predict", INFER])
@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "+10", " 5 5", "99999999999999999999999"])
def test_a_bad_content_length_gets_400_at_once(make_server, path: str, value: str) -> None:
    agent, server = make_server()
    with connect(server, timeout=3) as sock:
        # Before the fix "-1" read until the client closed (100 MB into the agent); here the client
        # keeps the connection open and sends more: the answer must come anyway, straight away.
        sock.sendall(request("POST", path, headers={"Content-Length": value}) + b"x" * 1000)
        status, _, body = read_response(sock)
        assert status == 400 and "Content-Length" in json.loads(body)["error"]
        assert closed_by_server(sock, 3)
    assert agent.status()["counters"]["bad_requests"] == 1


@pytest.mark.parametrize("path", ["/predict", INFER])
def test_a_post_without_content_length_is_refused(make_server, path: str) -> None:
    _, server = make_server()
    with connect(server, timeout=3) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _, body = read_response(sock)
    assert status == 400 and "Content-Length" in json.loads(body)["error"]


def test_the_default_body_limit_is_8_mib_and_is_checked_before_reading(make_server) -> None:
    assert HttpLimits().max_body_bytes == 8 * 1024 * 1024
    _, server = make_server()
    for path in ("/predict", INFER):
        with connect(server, timeout=3) as sock:
            sock.sendall(request("POST", path, headers={"Content-Length": str(8 * 1024 * 1024 + 1)}))
            status, _, body = read_response(sock)  # no body sent: the answer cannot wait for it
            assert status == 413 and "limit" in json.loads(body)["error"]
            assert closed_by_server(sock, 3)


def test_a_request_over_the_sample_cap_is_refused_and_counted(make_server) -> None:
    agent, server = make_server(HttpLimits(max_samples=10))
    with connect(server) as sock:
        for path, body in (("/predict", predict_body(11)), (INFER, infer_body(11))):
            sock.sendall(request("POST", path, body))
            status, _, answer = read_response(sock)
            assert status == 413 and "http.max_samples" in json.loads(answer)["error"]
        for path, body in (("/predict", predict_body(10)), (INFER, infer_body(10))):
            sock.sendall(request("POST", path, body))
            assert read_response(sock)[0] == 200
    counters = agent.status()["counters"]
    assert counters["bad_requests"] == 2 and counters["predictions"] == 20


@pytest.mark.parametrize("partial", [
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le",  # half a head
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inputs\"",  # half a body
])
def test_a_half_sent_request_times_out(make_server, partial: bytes) -> None:
    _, server = make_server(HttpLimits(request_timeout=0.5))
    with connect(server, timeout=5) as sock:
        sock.sendall(partial)
        t0 = time.monotonic()
        status, _, body = read_response(sock)
        assert status == 408 and "http.timeout" in json.loads(body)["error"]
        assert closed_by_server(sock, 3) and time.monotonic() - t0 < 4
    # Trickling bytes does not reset the clock: the whole request must arrive within the timeout.
    with connect(server, timeout=5) as sock:
        t0 = time.monotonic()
        try:
            for byte in partial:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass  # closed while trickling: what the test wants
        assert closed_by_server(sock, 3) and time.monotonic() - t0 < 4


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(make_server) -> None:
    _, server = make_server(HttpLimits(request_timeout=0.5))
    with connect(server) as sock:
        sock.sendall(request("GET", "/healthz"))
        assert read_response(sock)[0] == 200
        assert closed_by_server(sock, 3)
    assert server.connection_count() == 0


def test_idle_sockets_cannot_lock_out_healthz(make_server) -> None:
    _, server = make_server()  # defaults: 64 connections
    idle = [connect(server) for _ in range(124)]
    try:
        idle[-1].sendall(b"GET /heal")  # a half-sent request among them
        with connect(server, timeout=3) as sock:
            sock.sendall(request("GET", "/healthz"))
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body)["ok"] is True
            assert server.connection_count() <= 64
        assert closed_by_server(idle[0], 3)  # the longest idle ones made room
    finally:
        for s in idle:
            s.close()


def test_each_response_leaves_in_one_write_on_a_nodelay_socket(make_server) -> None:
    """The mechanism behind keep-alive without a 40 ms stall per request (Nagle + delayed ACK).

    Before the fix the status line and headers went out in one small write and the body in a
    second; a keep-alive client then waited for the delayed ACK on every request. The timing itself
    is measured in benchmarks/bench_agent.py, not asserted here.
    """
    _, server = make_server()
    with connect(server) as sock:
        sock.sendall(request("GET", "/healthz"))
        assert read_response(sock)[0] == 200
        [conn] = list(server._connections)
        transport = conn.transport
        assert transport is not None
        server_sock = transport.get_extra_info("socket")
        assert server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        writes: list[int] = []
        real_write = transport.write

        def counting_write(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            real_write(data)

        transport.write = counting_write  # type: ignore[method-assign]
        for path, body in (("/predict", predict_body(1)), ("/predict", predict_body(32)), (INFER, infer_body(4))):
            sock.sendall(request("POST", path, body))
            status, _, answer = read_response(sock)
            assert status == 200 and writes[-1] > len(answer)  # the head rode in the same write
        assert len(writes) == 3  # one write per response, head and body together


def test_requests_pipelined_on_one_connection_are_answered_in_order(make_server) -> None:
    agent, server = make_server()
    x = digits_like_inputs(3, seed=4)
    direct = agent.predict(x).labels
    with connect(server) as sock:
        sock.sendall(b"".join(request("POST", "/predict", json.dumps({"inputs": x[i:i + 1].tolist()}).encode())
                              for i in range(3)) + request("GET", "/healthz"))
        answers = [json.loads(read_response(sock)[2]) for _ in range(4)]
    assert [a["predictions"][0] for a in answers[:3]] == direct and answers[3]["ok"]


def test_expect_100_continue_is_answered_before_the_body(make_server) -> None:
    _, server = make_server()
    body = predict_body(1)
    with connect(server, timeout=3) as sock:
        sock.sendall(request("POST", "/predict", headers={"Content-Length": str(len(body)),
                                                          "Expect": "100-continue"}))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert read_response(sock)[0] == 200


def test_a_large_batch_in_the_worker_pool_does_not_hold_up_healthz(make_server) -> None:
    agent, server = make_server()
    big = predict_body(4000, seed=5)  # ~1 MB of JSON: answered by a worker thread, not the loop
    with connect(server, timeout=10) as sock:
        sock.sendall(request("POST", "/predict", big))
        status, _, answer = read_response(sock)
    assert status == 200 and len(json.loads(answer)["predictions"]) == 4000
    assert agent.status()["counters"]["predictions"] == 4000


# -- what is remembered for late labels ------------------------------------------------------------

def test_predictions_are_remembered_only_under_a_client_request_id_and_within_a_byte_budget(make_server) -> None:
    agent, server = make_server(request_memory_bytes=4096)
    with connect(server) as sock:
        for i in range(50):
            sock.sendall(request("POST", "/predict", predict_body(8, seed=i)))
            status, _, answer = read_response(sock)
            assert status == 200 and json.loads(answer)["request_id"] is None  # no id invented
        assert agent._monitor.remembered_request_bytes == 0
        for i in range(50):  # 50 x 64 samples with ids: far more than 4 KiB of predictions
            body = json.dumps({"inputs": digits_like_inputs(64, seed=i).tolist(), "request_id": f"r{i}"}).encode()
            sock.sendall(request("POST", "/predict", body))
            assert read_response(sock)[0] == 200
        assert 0 < agent._monitor.remembered_request_bytes <= 4096
        # The newest are kept, the oldest forgotten.
        sock.sendall(request("POST", "/labels", json.dumps({"labels": [0] * 64, "request_id": "r49"}).encode()))
        assert read_response(sock)[0] == 200
        sock.sendall(request("POST", "/labels", json.dumps({"labels": [0] * 64, "request_id": "r0"}).encode()))
        status, _, answer = read_response(sock)
        assert status == 400 and "r0" in json.loads(answer)["error"]


def test_labels_consume_the_predictions_they_label(make_server) -> None:
    agent, server = make_server()
    with connect(server) as sock:
        sock.sendall(request("POST", "/predict", predict_body(2)))
        classes = json.loads(read_response(sock)[2])["classes"]
        sock.sendall(request("POST", "/predict", json.dumps(
            {"inputs": digits_like_inputs(3).tolist(), "request_id": "abc"}).encode()))
        assert read_response(sock)[0] == 200
        outcomes = []
        for doc in ({"labels": classes}, {"labels": classes}, {"labels": [1, 2, 3], "request_id": "abc"},
                    {"labels": [1, 2, 3], "request_id": "abc"}):
            sock.sendall(request("POST", "/labels", json.dumps(doc).encode()))
            outcomes.append(read_response(sock)[0])
    assert outcomes == [200, 400, 200, 400]
    closed = agent.close_window()
    assert closed is not None and closed.confusion is not None
    assert int(closed.confusion.sum()) == 5 == closed.n  # never more labels than predictions


def test_the_limits_come_from_agent_toml_and_flags(tmp_path: Path) -> None:
    import argparse

    from device_agent.errors import ConfigError
    from device_agent.settings import apply_flags, load_settings

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nbundle = "b"\ndevice_id = "d"\n[http]\nmax_body_bytes = 1000\ntimeout = 2.5\n'
                   "request_memory_bytes = 100\n")
    args = argparse.Namespace(http_max_samples=7, http_max_body_bytes=None, http_max_connections=None,
                              http_timeout=None)
    limits = apply_flags(load_settings(cfg), args).http_limits
    assert limits == HttpLimits(max_body_bytes=1000, max_samples=7, request_timeout=2.5, request_memory_bytes=100)
    args.http_timeout = 4.0  # the flag users type is still --http-timeout
    assert apply_flags(load_settings(cfg), args).http_limits.request_timeout == 4.0
    cfg.write_text('[agent]\nbundle = "b"\ndevice_id = "d"\n[http]\ntimeout = "soon"\n')
    with pytest.raises(ConfigError, match=r"'http\.timeout'"):
        load_settings(cfg)
    cfg.write_text('[agent]\nbundle = "b"\ndevice_id = "d"\n[http]\nmax_body = 1000\n')
    with pytest.raises(ConfigError, match=r"http\.max_body"):
        load_settings(cfg)
    cfg.write_text('[agent]\nbundle = "b"\ndevice_id = "d"\n[http]\nmax_connections = 0\n')
    with pytest.raises(ConfigError, match=r"http\.max_connections"):
        load_settings(cfg)


def padded_predict_body(n: int, size: int, seed: int = 0) -> bytes:
    """A /predict body of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = predict_body(n, seed)
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_large_bodies_share_one_budget_of_arrived_bytes_and_wait_instead_of_failing(make_server, monkeypatch) -> None:
    """Connections sending large bodies hold only what arrived; one that would overflow the budget
    waits (is not read) instead of getting 503, small requests go through meanwhile, and every body
    is answered in the end without the budget ever exceeding BODY_BUDGET_FACTOR bodies."""
    from device_agent.http import server as server_module

    monkeypatch.setattr(server_module, "INLINE_BODY_BYTES", 4096)  # 90 kB bodies count as large
    limit, size = 100_000, 90_000
    _, server = make_server(HttpLimits(max_body_bytes=limit))
    peak = [0]
    take = server._take_budget

    def watched(conn, n):  # the budget's high-water mark, seen from inside the server
        ok = take(conn, n)
        peak[0] = max(peak[0], server._body_bytes)
        return ok

    monkeypatch.setattr(server, "_take_budget", watched)
    bodies = [padded_predict_body(20, size, seed=i) for i in range(3)]
    a, b, c = (connect(server, timeout=15) for _ in range(3))
    try:
        for sock, body in ((a, bodies[0]), (b, bodies[1]), (c, bodies[2])):
            sock.sendall(request("POST", "/predict", body[:50_000], headers={"Content-Length": str(size)}))
            time.sleep(0.2)
        wait_until(lambda: len(server._waiting) == 1, 10, "the third body to wait for the budget")
        assert server._body_bytes == 100_000  # a and b: what arrived, not the 270 kB announced
        with connect(server, timeout=5) as small:  # a small request is served while large ones wait
            small.sendall(request("POST", "/predict", predict_body(1)))
            assert read_response(small)[0] == 200
        a.sendall(bodies[0][50_000:])  # over the shared part: a, the oldest, may finish alone
        assert read_response(a)[0] == 200
        b.sendall(bodies[1][50_000:])
        assert read_response(b)[0] == 200
        c.sendall(bodies[2][50_000:])
        assert read_response(c)[0] == 200
        assert 100_000 < peak[0] <= server_module.BODY_BUDGET_FACTOR * limit
        wait_until(lambda: server._body_bytes == 0, 5, "the budget to be free again")
    finally:
        for sock in (a, b, c):
            sock.close()


def test_connections_do_not_start_threads(make_server) -> None:
    import threading

    _, server = make_server()
    with connect(server) as first:  # the first large request starts the one worker thread
        first.sendall(request("POST", "/predict", predict_body(1000)))
        assert read_response(first)[0] == 200
    before = threading.active_count()
    socks = [connect(server) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(request("GET", "/healthz"))
        for sock in socks:
            assert read_response(sock)[0] == 200
        assert threading.active_count() == before
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.integration
def test_edge_agent_run_applies_the_http_flags(bundle_v1: Path, tmp_path: Path, edge_agent_cli) -> None:
    from tests.helpers.mqtt import AgentProcess

    bad = edge_agent_cli("run", "--bundle", str(bundle_v1), "--broker", "mqtt://127.0.0.1:1", "--device-id", "d",
                         "--http", "127.0.0.1:0", "--http-max-body-bytes", "0", timeout=60)
    assert bad.returncode == 2 and "max_body_bytes" in bad.stderr, bad.stderr
    # No broker is needed to serve HTTP: the agent spools and keeps trying it.
    agent = AgentProcess(tmp_path, "--bundle", str(bundle_v1), "--broker", "mqtt://127.0.0.1:1", "--device-id", "d",
                         "--spool", str(tmp_path / "spool.db"), "--http-max-body-bytes", "1000",
                         "--http-max-samples", "3")
    try:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
            sock.sendall(request("POST", "/predict", headers={"Content-Length": "1001"}))
            assert read_response(sock)[0] == 413
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as sock:
            body = json.dumps({"inputs": [[1] * 64] * 4}, separators=(",", ":")).encode()  # 4 samples
            assert len(body) < 1000
            sock.sendall(request("POST", "/predict", body))
            status, _, answer = read_response(sock)
            assert status == 413 and "max_samples" in json.loads(answer)["error"]
    finally:
        assert agent.stop() == 0


def test_many_large_bodies_sent_in_pieces_all_finish_within_the_budget(make_server, monkeypatch) -> None:
    """Twelve clients trickle bodies of random sizes in random pieces: the budget never wedges them
    (every one is answered 200), never exceeds its bound, and is empty afterwards."""
    import random
    import threading

    from device_agent.http import server as server_module

    limit = 200_000
    _, server = make_server(HttpLimits(max_body_bytes=limit, request_timeout=30))
    peak = [0]
    take = server._take_budget

    def watched(conn, n):
        ok = take(conn, n)
        peak[0] = max(peak[0], server._body_bytes)
        return ok

    monkeypatch.setattr(server, "_take_budget", watched)
    statuses: list[int] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        body = padded_predict_body(20, rng.randrange(70_000, limit), seed=seed)
        data = request("POST", "/predict", body)
        with connect(server, timeout=60) as sock:
            sent = 0
            while sent < len(data):
                piece = rng.randrange(1, 60_000)
                sock.sendall(data[sent : sent + piece])
                sent += piece
                time.sleep(rng.random() * 0.02)
            statuses.append(read_response(sock)[0])

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * 12
    assert peak[0] <= server_module.BODY_BUDGET_FACTOR * limit
    wait_until(lambda: server._body_bytes == 0 and not server._waiting, 5, "the budget to be free again")
