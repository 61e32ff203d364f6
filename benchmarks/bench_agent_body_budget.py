"""Peak memory of a real `edge-agent run --http` under bodies at the 8 MiB limit: one client vs eight.

    python benchmarks/bench_agent_body_budget.py [--bundle PATH] [--requests N]

Each scenario starts a fresh `edge-agent run` (no broker: the agent spools and serves HTTP alone) and
reads its peak resident memory (VmHWM in /proc/PID/status) after the clients are done:

- one client sending N JSON bodies just under the limit (4,096 samples, numbers written long);
- eight clients doing the same at once (the shared body budget should make this cost about one
  extra body limit, not seven bodies);
- the same eight plus four sockets that announce 8 MiB bodies and never send them (they must
  neither reserve memory nor make the real clients fail).

Each scenario also records every client's status codes: a body budget that made clients fail
(503, resets) would show there, not as a lower peak.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table, write_result  # noqa: E402
from device_agent.agent import load_model  # noqa: E402
from device_agent.host import host_info  # noqa: E402
from device_agent.http.protocol import HttpLimits  # noqa: E402
from harness.processes import cli_env, free_port, wait_for_port  # noqa: E402


def json_body_at_limit(bundle: Path) -> bytes:
    limit = HttpLimits().max_body_bytes
    shape = load_model(bundle).runtime.sample_shape
    x = np.random.default_rng(3).random((4096, int(np.prod(shape))), dtype=np.float32)
    per_value = (limit - 2 * len(x) - 64) // x.size - 2
    body = ("{\"inputs\": [" + ",".join(
        "[" + ",".join(f"{v:.{per_value}f}"[:per_value + 1] for v in row) + "]" for row in x) + "]}").encode()
    assert len(body) <= limit
    return body


def _vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def scenario(bundle: Path, tmp: Path, body: bytes, clients: int, idle_announcers: int, requests: int) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--bundle", str(bundle), "--device-id", "b",
                             "--broker", "mqtt://127.0.0.1:1", "--spool", str(tmp / f"spool-{port}.db"),
                             "--http", f"127.0.0.1:{port}"], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    statuses: list[int] = []
    announcers: list[socket.socket] = []
    try:
        wait_for_port(port, timeout=60)
        time.sleep(0.5)
        idle = _vm(proc.pid)["VmRSS"]
        for _ in range(idle_announcers):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {HttpLimits().max_body_bytes}\r\n\r\n".encode())
            announcers.append(sock)

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for _ in range(requests):
                try:
                    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    statuses.append(resp.status)
                except OSError:
                    statuses.append(0)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.close()

        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        peak = _vm(proc.pid)["VmHWM"]
    finally:
        for sock in announcers:
            sock.close()
        proc.terminate()
        proc.wait(timeout=15)
    return {"clients": clients, "idle_announcers": idle_announcers, "requests": len(statuses),
            "statuses": {str(k) if k else "reset": statuses.count(k) for k in sorted(set(statuses))},
            "idle_rss_mb": round(idle / 1024, 1), "peak_rss_mb": round(peak / 1024, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="bundle to serve (default: dist/digits-*.edgebundle or a generated one)")
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    args = parser.parse_args()
    from benchmarks.bench_agent import find_bundle

    machine = host_info(("numpy", "onnxruntime"))
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory(prefix="bench-body-budget-") as tmp_dir:
        tmp = Path(tmp_dir)
        bundle, source = find_bundle(tmp, args.bundle)
        print(f"bundle: {bundle} ({source})")
        body = json_body_at_limit(bundle)
        rows = [scenario(bundle, tmp, body, clients, idle, args.requests) for clients, idle in ((1, 0), (8, 0), (8, 4))]
    print_table(rows)
    figures = {f"peak_rss_mb_{r['clients']}_clients_{r['idle_announcers']}_idle": r["peak_rss_mb"] for r in rows}
    figures["idle_rss_mb"] = rows[0]["idle_rss_mb"]
    figures["json_body_bytes"] = len(body)
    path = write_result("agent_body_budget", figures, rows=rows, bundle_source=source)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
