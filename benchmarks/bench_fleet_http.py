"""Fleet server HTTP latency with keep-alive vs a new connection per request (the 40 ms stall).

A server that writes the status line + headers and the body in separate small writes, without
TCP_NODELAY, holds every keep-alive answer ~40 ms (Nagle's algorithm meets the client's delayed ACK). Here one
client sends sequential requests to the Starlette/uvicorn server, on one keep-alive connection and with a
new connection each time, side by side in one run, for `/healthz` (no database) and `/api/devices`.
With `--old-root DIR` (a checkout of the code before the rewrite, e.g. `git worktree add /tmp/old main~N`)
the old server runs in a subprocess from that tree and is measured in the same run.

    python benchmarks/bench_fleet_http.py [--quick] [--old-root DIR]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_result  # noqa: E402

SERVE = """
import sys, time
sys.path[:0] = [{root!r}]
from harness.fleetkit import make_bundle
from pathlib import Path
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.server import make_server
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
tmp = Path({tmp!r})
bundle = make_bundle(tmp)
svc = FleetService(Storage(f"sqlite:///{{tmp}}/fleet.db"), ReferenceStore([bundle.path]), parse_settings({{}}))
server = make_server(svc, "127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _serve(root: Path, tmp: Path) -> tuple[subprocess.Popen[str], int]:
    code = SERVE.format(root=str(root), tmp=str(tmp))
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, port


def _measure(port: int, path: str, n: int, keep_alive: bool) -> dict[str, float]:
    times = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10) if keep_alive else None
    for _ in range(n):
        t0 = time.perf_counter()
        c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path, headers={} if keep_alive else {"Connection": "close"})
        r = c.getresponse()
        r.read()
        if status_bad := r.status >= 500 or r.status == 404:
            raise RuntimeError(f"{path}: HTTP {r.status} ({status_bad})")
        if conn is None:
            c.close()
        times.append(time.perf_counter() - t0)
    if conn is not None:
        conn.close()
    times.sort()
    return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))],
            "req_per_s": len(times) / sum(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--old-root", type=Path, help="checkout of the code before the rewrite, to measure side by side")
    args = ap.parse_args()
    n = 50 if args.quick else 300
    roots = [("starlette+uvicorn", ROOT)] + ([("http.server (old)", args.old_root)] if args.old_root else [])
    rows: list[dict[str, Any]] = []
    for label, root in roots:
        with tempfile.TemporaryDirectory() as tmp:
            proc, port = _serve(root, Path(tmp))
            try:
                for path in ("/api/devices", "/healthz") if label.startswith("starlette") else ("/api/devices",):
                    for keep_alive in (True, False):
                        figures = _measure(port, path, n, keep_alive)
                        rows.append({"server": label, "path": path,
                                     "connection": "keep-alive" if keep_alive else "new per request", **figures})
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print_table(rows)
    write_result("fleet_http", {"rows": rows, "requests_each": n})


if __name__ == "__main__":
    main()
