"""Shared by the test_captures_* tests: a real `edge-kit fleet serve` subprocess, capture records as an agent
makes them for the digits test bundle, and plain HTTP calls (no retries, every status seen)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from harness.fleetkit import LABELS, OPERATOR_TOKEN, DigitsBundle, logits, sample_images
from harness.processes import cli_env, free_port, wait_for_port

UPLOAD = "/api/captures/upload"
LABELS_PATH = "/api/captures/labels"


class FleetServe:
    """`edge-kit fleet serve` in its own process group: SIGTERM to stop, SIGKILL to crash it."""

    def __init__(self, tmp: Path, broker_url: str, bundles: Path, *extra: str, fleet: str = "cap",
                 db: str | None = None, scheme: str = "http", name: str = "fleet") -> None:
        self.port = free_port()
        self.scheme = scheme
        self.token = tmp / "operator.token"
        self.token.write_text(OPERATOR_TOKEN + "\n")
        self.argv = [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", broker_url,
                     "--db", db or f"sqlite:///{tmp}/fleet.db", "--http", f"127.0.0.1:{self.port}", "--fleet", fleet,
                     "--bundles", str(bundles), "--token-file", str(self.token), *extra]
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=cli_env(), stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 120
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                wait_for_port(self.port, timeout=1)
                return
            except TimeoutError:
                continue
        self.stop()
        raise AssertionError(self.log.read_text(errors="replace")[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)
        self.proc = None


def record(bundle: DigitsBundle, rng: np.random.Generator, **override: Any) -> dict[str, Any]:
    """One captured row of the digits bundle as the agent uploads it (float32 (1, 8, 8), 10 classes)."""
    x, _ = sample_images(1, rng)
    x32 = x[0].astype("<f4")
    out = logits(x)[0]
    rec = {"id": secrets.token_hex(16), "created": time.time(), "request_id": secrets.token_hex(8), "row": 0,
           "window_start": float(int(time.time() // 60) * 60), "model_sha256": bundle.sha256,
           "input": {"dtype": "float32", "shape": [1, 8, 8], "data": base64.b64encode(x32.tobytes()).decode()},
           "output": [float(v) for v in out], "predicted": int(out.argmax()), "label": None}
    rec.update(override)
    return rec


def batch(device: str, records: list[Any]) -> dict[str, Any]:
    return {"schema": "edgekit.captures/1", "device": device, "records": records}


def call(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    """(status, parsed JSON answer) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    request = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, text


def device_headers(device: str, token: str) -> dict[str, str]:
    return {"X-Edgekit-Device": device, "Authorization": f"Device {token}"}


def operator() -> dict[str, str]:
    return {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def export_all(base: str, query: str = "", limit: int = 7, context: ssl.SSLContext | None = None
               ) -> list[dict[str, Any]]:
    """Every record of GET /api/captures, page by page (`limit` small so paging is exercised)."""
    out: list[dict[str, Any]] = []
    after = ""
    for _ in range(10_000):
        sep = "&" if query else ""
        status, page = call(f"{base}/api/captures?{query}{sep}limit={limit}{after}", headers=operator(),
                            context=context)
        assert status == 200, page
        out += page["records"]
        assert not page["missing"]
        if page["next"] is None:
            return out
        after = f"&after={urllib.parse.quote(page['next'])}"
    raise AssertionError("export never ended")


def input_array(rec: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(rec["input"]["data"]), dtype="<f4").reshape(rec["input"]["shape"])


__all__ = ["LABELS", "OPERATOR_TOKEN"]


def status_for_declared_length(port: int, path: str, headers: dict[str, str], length: int) -> int:
    """The status answered to a POST head declaring `length` body bytes, before any of them is sent (a
    server that refuses the size answers at once; a client sending megabytes first would see a reset)."""
    import socket

    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
            f"Content-Length: {length}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall("\r\n".join(head).encode())
        answer = s.recv(4096).decode("latin-1")
    return int(answer.split(" ", 2)[1])
