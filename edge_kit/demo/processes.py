"""Child processes of the demo: started with their own log file, checked for readiness, stopped cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import edge_kit

# This checkout's packages first, for every child (the demo runs from a source tree or an install).
PACKAGE_ROOT = str(Path(edge_kit.__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be taken
    by some outgoing connection (an agent's MQTT client) before the server that was meant to get it binds."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """GET (or POST `body` as JSON) and decode the JSON answer; HTTP errors raise with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("EDGEKIT_FLEET_TOKEN"):  # the fleet server's operator token (the demo sets one)
        headers["Authorization"] = f"Bearer {os.environ['EDGEKIT_FLEET_TOKEN']}"
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{request.method} {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc


class ManagedProcess:
    """One child: stdout to `<name>.out`, stderr to `<name>.log`, in its own process group."""

    def __init__(self, name: str, cmd: list[str], logs: Path, *, cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.stdout_path = logs / f"{name}.out"
        self.log_path = logs / f"{name}.log"
        logs.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as out, self.log_path.open("ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=child_env(),
                                         start_new_session=True)

    @classmethod
    def python(cls, name: str, module: str, args: list[str], logs: Path, **kw: Any) -> ManagedProcess:
        return cls(name, [sys.executable, "-m", module, *args], logs, **kw)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.running:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: " + " | ".join(tail))

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (the graceful path: agents close and spool their last window), then SIGKILL if it hangs;
        then whatever it started and left behind in its process group (e.g. a retraining build)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the group holds only its descendants
        return self.proc.returncode

    def final_json(self) -> dict[str, Any] | None:
        """The one JSON object a `--json` command printed on stdout when it ended, if any."""
        try:
            lines = self.stdout_path.read_text().strip().splitlines()
            return dict(json.loads(lines[-1])) if lines else None
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            return None
