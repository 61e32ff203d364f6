"""One real local Ray instance for the whole test session: 2 CPUs, a small object store, its own token.

Started with `ray start --head --block` in a session of its own, so stopping it (SIGTERM, then SIGKILL
to the process group) ends exactly the processes it started and no other Ray on the machine. Its
token is random and passed by environment: Ray's default token file (~/.ray/auth_token) is shared by
every Ray instance of the user. Ray's servers listen on every interface (Ray has no loopback-only
switch); the node address is 127.0.0.1 and the token keeps other clients out.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = "Ray runtime started"


@dataclass(frozen=True)
class RayCluster:
    address: str
    pid: int  # of `ray start --block`; the raylet and the workers are its descendants
    env: dict[str, str]  # for CLI subprocesses: this checkout first, the cluster's token

    def run_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**self.env, **(extra or {})}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONHASHSEED", "0")
    env.update({"GIT_PYTHON_REFRESH": "quiet", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "RAY_USAGE_STATS_ENABLED": "0", "DVC_NO_ANALYTICS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING"})
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ekray", dir="/tmp"))  # short: Ray's unix socket paths must fit
    env = _env(secrets.token_hex(32))
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp}", f"--object-store-memory={96 * 1024 * 1024}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while READY not in (temp / "head.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray did not start: {(temp / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield RayCluster(f"127.0.0.1:{port}", proc.pid, env)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import psutil

    # Workers run in sessions of their own, but they are the raylet's children: collect the whole tree.
    try:
        ours = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        ours = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    # Whatever of the group is left (raylet, workers) goes now.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for p in ours:
        with contextlib.suppress(psutil.Error):
            p.kill()


def train_workers(cluster: RayCluster) -> list[int]:
    """Pids of the Ray Train worker processes running on this instance now."""
    import psutil

    found = []
    for p in psutil.Process(cluster.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found
