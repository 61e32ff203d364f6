"""A small real HTTP server for bundle bytes, for the deployment tests and the rollout benchmark.

It speaks what the fleet's download endpoint speaks (`GET /api/bundles/<sha256>`, `ETag: "<sha256>"`,
`Range: bytes=N-` with `If-Range`, 503 + `Retry-After` beyond a cap on concurrent downloads) and adds
what a fault test needs: a byte counter per request, a per-connection throttle, and a switch that
serves altered bytes under the right name. It runs in its own thread (`ThreadingHTTPServer`), so the
agent under test downloads over a real socket.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PREFIX = "/api/bundles/"


@dataclass
class Served:
    """What the server did: one entry per request (device, status, first byte, bytes sent)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bytes_sent(self, sha256: str | None = None) -> int:
        with self.lock:
            return sum(r["sent"] for r in self.requests if sha256 is None or r["sha256"] == sha256)

    def count(self, status: int) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["status"] == status)


class BundleServer:
    """Serve files by their sha256. `throttle` bytes/s per connection (0: as fast as possible);
    `max_concurrent` downloads at once (0: no cap), the rest get 503 with `Retry-After: retry_after`;
    `alter` sha256s are served with one byte flipped."""

    def __init__(self, *, throttle: int = 0, max_concurrent: int = 0, retry_after: int = 1) -> None:
        self.files: dict[str, bytes] = {}
        self.alter: set[str] = set()
        self.throttle = throttle
        self.max_concurrent = max_concurrent
        self.retry_after = retry_after
        self.served = Served()
        self._active = 0
        self._active_lock = threading.Lock()
        self.peak_concurrent = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    def add(self, path: Path) -> str:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.files[sha] = data
        return sha

    def url(self, sha256: str) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}{sha256}"

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> BundleServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bundle-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _enter(self) -> bool:
        with self._active_lock:
            if self.max_concurrent and self._active >= self.max_concurrent:
                return False
            self._active += 1
            self.peak_concurrent = max(self.peak_concurrent, self._active)
            return True

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1


def _handler_for(server: BundleServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            sha = self.path.removeprefix(PREFIX)
            record: dict[str, Any] = {"sha256": sha, "device": self.headers.get("X-Edgekit-Device"),
                                      "range": self.headers.get("Range"), "status": 0, "sent": 0}
            with server.served.lock:
                server.served.requests.append(record)
            data = server.files.get(sha) if self.path.startswith(PREFIX) else None
            if data is None:
                record["status"] = 404
                self._empty(404)
                return
            if not server._enter():
                record["status"] = 503
                self._empty(503, {"Retry-After": str(server.retry_after)})
                return
            try:
                self._send(sha, data, record)
            finally:
                server._leave()

        def _send(self, sha: str, data: bytes, record: dict[str, Any]) -> None:
            if sha in server.alter:
                data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
            etag = f'"{sha}"'
            start = 0
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if wanted and (if_range is None or if_range == etag):
                try:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                except ValueError:
                    start = -1
                if not 0 <= start < len(data):
                    record["status"] = 416
                    self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
            status = 206 if start else 200
            record["status"] = status
            self.send_response(status)
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            step = 4096 if server.throttle else 256 * 1024
            began = time.monotonic()
            for offset in range(start, len(data), step):
                chunk = data[offset:offset + step]
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                record["sent"] += len(chunk)
                if server.throttle:
                    # Pace to the rate since the response began (sleeps absorb scheduling hiccups).
                    ahead = record["sent"] / server.throttle - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

        def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.bundle_server FILE... [--max-concurrent N] [--retry-after S] [--throttle B/s]`:
    serve in a process of its own (so a benchmark can measure its CPU and memory apart from the
    clients); prints `PORT <n>` then, on SIGTERM, one JSON line of what it served."""
    import argparse
    import json
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m harness.bundle_server")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--max-concurrent", type=int, default=0)
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--throttle", type=int, default=0)
    args = parser.parse_args(argv)
    server = BundleServer(throttle=args.throttle, max_concurrent=args.max_concurrent, retry_after=args.retry_after)
    for path in args.files:
        server.add(path)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    server.start()
    print(f"PORT {server.port}", flush=True)
    done.wait()
    server.stop()
    served = server.served
    print(json.dumps({"bytes_sent": served.bytes_sent(), "requests": len(served.requests),
                      "answered_503": served.count(503), "answered_200": served.count(200),
                      "answered_206": served.count(206), "peak_concurrent": server.peak_concurrent}), flush=True)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
