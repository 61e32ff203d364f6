"""The fleet consumer survives broker restarts, against a real Mosquitto.

Real processes throughout: `edge-agent run` devices answering /predict and publishing windows,
`edge-kit fleet serve` ingesting them, and a Mosquitto with persistence that is stopped and
started again under them. Nothing is mocked: the broker process really goes away.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.bundles import digits_like_inputs, make_bundle
from harness.processes import MosquittoBroker, cli_env, free_port, wait_for_port
from tests.helpers.mqtt import AgentProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "reconnect"
AGENT_CONFIG = "[agent]\nwatch_interval = 0.5\n[mqtt]\nreconnect_min = 0.2\nreconnect_max = 1.0\n"


@pytest.fixture(scope="module")
def device_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("reconnect-bundle"), seed=0, version="1.0.0")


class FleetServer:
    """`edge-kit fleet serve` in its own process group, so stopping it takes its consumers too."""

    def __init__(self, tmp_path: Path, broker: MosquittoBroker, bundle: Path, workers: int) -> None:
        self.port = free_port()
        self.db = tmp_path / "fleet.db"
        self.log = tmp_path / "fleet.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", broker.url, "--db",
                 f"sqlite:///{self.db}", "--http", f"127.0.0.1:{self.port}", "--fleet", FLEET, "--bundle",
                 str(bundle), "--workers", str(workers)],
                env=cli_env(), stdout=out, stderr=out, start_new_session=True)
        wait_for_port(self.port, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthz(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}

    def stored(self) -> tuple[int, int]:
        """(windows, sum of n) in the fleet database."""
        with sqlite3.connect(self.db) as conn:
            count, total = conn.execute("SELECT COUNT(*), COALESCE(SUM(n), 0) FROM windows").fetchone()
        return int(count), int(total)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return int(self.proc.returncode)


@pytest.fixture
def fleet_server(tmp_path: Path, mosquitto: MosquittoBroker,
                 device_bundle: Path) -> Iterator[Callable[[int], FleetServer]]:
    servers: list[FleetServer] = []

    def start(workers: int) -> FleetServer:
        servers.append(FleetServer(tmp_path, mosquitto, device_bundle, workers))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _wait(cond: Callable[[], Any], timeout: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    tail = f"\n--- fleet log ---\n{log.read_text(errors='replace')[-4000:]}" if log is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def test_every_answered_inference_is_stored_across_two_broker_restarts(
        tmp_path: Path, mosquitto: MosquittoBroker, device_bundle: Path,
        fleet_server: Callable[[int], FleetServer]) -> None:
    server = fleet_server(2)
    _wait(lambda: server.healthz()[0] == 200, 60, "the consumers to connect", server.log)
    args = ["--bundle", str(device_bundle), "--broker", mosquitto.url, "--fleet", FLEET, "--window-seconds", "1"]
    agents = [AgentProcess(tmp_path, *args, "--device-id", f"dev{i}", "--spool", str(tmp_path / f"spool{i}.db"),
                           config=AGENT_CONFIG) for i in range(2)]
    answered = [0]
    stop_feeding = threading.Event()

    def feed() -> None:
        x = digits_like_inputs(3, seed=5).tolist()
        while not stop_feeding.is_set():
            for agent in agents:
                answered[0] += len(agent.post("/predict", {"inputs": x})["predictions"])
            stop_feeding.wait(0.1)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        for restart in range(2):
            before = server.stored()[0]
            _wait(lambda b=before: server.stored()[0] >= b + 2, 30, f"windows stored before restart {restart + 1}",
                  server.log)
            mosquitto.stop()
            _wait(lambda: server.healthz()[0] == 503, 15, "the fleet to notice the broker is gone", server.log)
            time.sleep(1.5)  # the agents keep answering and spool their windows meanwhile
            mosquitto.start()
            down = server.stored()[0]
            # The consumer must come back by itself and store again (the old one spun forever here).
            _wait(lambda d=down: server.stored()[0] >= d + 2, 60, f"ingest to resume after restart {restart + 1}",
                  server.log)
            # Every consumer back (ready), not just the one that stored those windows: one still in its
            # reconnect backoff when the next restart comes would count a single reconnect for both.
            _wait(lambda: server.healthz()[0] == 200, 60, f"every consumer back after restart {restart + 1}",
                  server.log)
    finally:
        stop_feeding.set()
        feeder.join(timeout=30)
    try:
        # Every window the agents closed has left their spools and reached the fleet database.
        for agent in agents:
            _wait(lambda a=agent: (s := a.status())["spool"]["pending"] == 0 and s["window"]["open_n"] == 0, 30,
                  "the agent to close and deliver its last window")
        predictions = sum(a.status()["counters"]["predictions"] for a in agents)
        assert predictions == answered[0]
        try:
            _wait(lambda: server.stored()[1] == answered[0], 60,
                  f"sum of n in the fleet database == {answered[0]} answered inferences", server.log)
        finally:  # on failure, say how far off it was
            print("stored (windows, sum n):", server.stored(), "answered:", answered[0],
                  "agent spools:", [a.status()["spool"] for a in agents])
        metrics = server.metrics()
        for worker in (0, 1):
            assert metrics[f'edgekit_fleet_mqtt_connected{{worker="{worker}"}}'] == 1
            assert metrics[f'edgekit_fleet_mqtt_reconnects_total{{worker="{worker}"}}'] >= 2
    finally:
        for agent in agents:
            agent.stop()
    assert server.stop() == 0, server.log.read_text()[-3000:]


def test_healthz_and_gauge_follow_the_broker(mosquitto: MosquittoBroker,
                                            fleet_server: Callable[[int], FleetServer]) -> None:
    server = fleet_server(1)
    connected = 'edgekit_fleet_mqtt_connected{worker="0"}'
    reconnects = 'edgekit_fleet_mqtt_reconnects_total{worker="0"}'
    _wait(lambda: server.healthz()[0] == 200, 60, "the consumer to connect", server.log)
    assert server.metrics()[connected] == 1 and server.metrics()[reconnects] == 0
    mosquitto.stop()
    _, doc = _wait(lambda: (h := server.healthz())[0] == 503 and h, 15, "healthz 503", server.log)
    assert doc["ready"] is False and doc["consumers"] == [{"worker": 0, "connected": False, "reconnects": 0}]
    assert server.metrics()[connected] == 0
    time.sleep(2.0)  # several failed attempts while it is down: still not ready, still 0
    assert server.healthz()[0] == 503 and server.metrics()[connected] == 0
    mosquitto.start()
    _wait(lambda: server.healthz()[0] == 200, 30, "healthz 200 once the broker is back", server.log)
    m = server.metrics()
    assert m[connected] == 1 and m[reconnects] == 1
