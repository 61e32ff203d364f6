"""Deployments end to end with real processes: a `fleet serve` subprocess, a real Mosquitto, the CLI.

Simulated devices (paho publishers, one identity each) report windows and status as agents do. The
fleet server is killed with SIGKILL mid-rollout and started again (the rollout carries on from its
database), and the broker is restarted with its persistence deleted mid-rollout (the server republishes
every retained deployment message on reconnect, so no device misses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.deploy.message import parse_deployment_message
from device_agent.uplink.wire import deployment_topic
from harness.fleetkit import OPERATOR_TOKEN, make_bundle
from harness.processes import MosquittoBroker, cli_env, free_port, run_cli, wait_for_port
from tests.helpers.deploykit import report, status, window
from tests.helpers.mqtt import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "itest"
DEVICES = ["dev0", "dev1", "dev2", "dev3"]


class Watcher:
    """A subscriber to every device's deployment topic: the latest message per device, and whether retained."""

    def __init__(self, port: int, name: str) -> None:
        self.latest: dict[str, tuple[dict[str, Any], bool]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(deployment_topic(FLEET), qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[2]
        doc = parse_deployment_message(msg.payload).to_dict() if msg.payload else {}
        with self.lock:
            self.latest[device] = (doc, bool(msg.retain))

    def actions(self) -> dict[str, str]:
        with self.lock:
            return {d: m.get("action", "") for d, (m, _) in self.latest.items()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "device publisher connected")

    def send(self, topic: str, payload: bytes, content_type: str, retain: bool = False) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = content_type
        wait_until(self.client.is_connected, 30, "device publisher connected")
        self.client.publish(topic, payload, qos=1, retain=retain or topic.endswith("/status"),
                            properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class FleetServer:
    """`edge-kit fleet serve` in its own process group (SIGKILL takes its consumers too)."""

    def __init__(self, args: list[str], log: Path, port: int) -> None:
        self.args, self.log, self.port = args, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_kit", *self.args], env=cli_env(), stdout=out,
                                         stderr=out, start_new_session=True)
        wait_for_port(self.port, timeout=90)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    folder, upload, big_dir, broker_dir = (tmp_path / n for n in ("bundles", "upload", "big", "broker"))
    for d in (folder, upload, big_dir, broker_dir):
        d.mkdir()
    v1 = make_bundle(folder, version="1.0.0")
    v2 = make_bundle(upload, version="1.1.0")  # not on the server: `fleet deploy` uploads it
    # A bundle too big to cross loopback's socket buffers at once: a download of it stays in progress.
    big = make_bundle(big_dir, version="9.0.0", model_bytes=np.random.default_rng(0).bytes(24 << 20)).path
    big = big.rename(folder / big.name)
    token = tmp_path / "token"
    token.write_text(OPERATOR_TOKEN + "\n")
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("[drift]\nevaluate_every_seconds = 1\nmin_n = 50\n")
    broker = MosquittoBroker(broker_dir)
    broker.start()
    port = free_port()
    server = FleetServer(["fleet", "serve", "--broker", broker.url, "--db", f"sqlite:///{tmp_path}/fleet.db",
                          "--http", f"127.0.0.1:{port}", "--fleet", FLEET, "--bundles", str(folder),
                          "--token-file", str(token), "--config", str(cfg), "--download-concurrency", "1"],
                         tmp_path / "server.log", port)
    try:
        yield {"v1": v1, "v2": v2, "big": big, "token": token, "broker": broker, "server": server,
               "base": f"http://127.0.0.1:{port}", "tmp": tmp_path}
    finally:
        server.kill()
        broker.stop()


def _cli(s: dict[str, Any], *args: str) -> dict[str, Any]:
    r = run_cli("edge_kit", "fleet", *args, "--server", s["base"], "--token-file", str(s["token"]), "--json",
                timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, (s["tmp"] / "server.log").read_text()[-3000:])
    return r.json()


def test_rollout_through_kill_and_broker_restart(setup: dict[str, Any]) -> None:
    s = setup
    v1, v2, broker, server, base = s["v1"], s["v2"], s["broker"], s["server"], s["base"]
    rng = np.random.default_rng(0)
    server.start()
    devices = Publisher(broker.port)
    early = Watcher(broker.port, "watch-early")
    watchers = [early]
    try:
        # Statuses are retained: once the fleet shows them, its consumer subscribed (summaries too, same SUBSCRIBE).
        for d in DEVICES:
            devices.send(*status(v1, d, fleet=FLEET, requests=300))
        auth = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

        def fleet_devices() -> dict[str, Any]:
            return dict(json.loads(_get(f"{base}/api/devices", auth)[2]))

        wait_until(lambda: len(fleet_devices().get("devices", [])) == 4, 60, "the fleet to see the 4 devices")
        now = time.time()
        for w in range(3):  # every device served v1 for a while: the control side of the canary
            for d in DEVICES:
                devices.send(*window(v1, d, now - 2400 + 300 * w, rng, fleet=FLEET, seq=w))
        wait_until(lambda: sum(m["windows"] for m in fleet_devices()["models"]) == 12, 60, "12 windows stored")

        # Without the token nothing is deployed (exit 2, the server's words); an unreachable server is exit 1.
        r = run_cli("edge_kit", "fleet", "deploy", str(v2.path), "--server", base, "--json", timeout=60,
                    env={"EDGEKIT_FLEET_TOKEN": ""})
        assert r.returncode == 2 and "operator token" in r.json()["error"]
        r = run_cli("edge_kit", "fleet", "rollout", "x", "--server", f"http://127.0.0.1:{free_port()}",
                    "--token-file", str(s["token"]), "--json", timeout=60)
        assert r.returncode == 1 and "cannot reach" in r.json()["error"]

        out = _cli(s, "deploy", str(v2.path), "--canary", "1", "--canary-windows", "2", "--auto-promote")
        dep = out["deployment"]
        assert set(out) == {"ok", "deployment", "state", "version", "devices", "canary"}
        assert out["state"] == "canary" and out["version"] == "1.1.0" and sorted(out["devices"]) == DEVICES
        canary = [d for d, v in out["devices"].items() if v["state"] == "told"]
        assert len(canary) == 1
        canary_dev = canary[0]
        rest = [d for d in DEVICES if d != canary_dev]
        v2_bytes = v2.path.read_bytes()
        v2_sha = hashlib.sha256(v2_bytes).hexdigest()

        # The canary's retained message reaches a subscriber that was there, and one that connects later.
        wait_until(lambda: early.actions() == {canary_dev: "install"}, 30, "the canary's message")
        late = Watcher(broker.port, "watch-late")
        watchers.append(late)
        wait_until(lambda: late.actions() == {canary_dev: "install"}, 30, "the retained message for a late subscriber")
        msg, retained = late.latest[canary_dev]
        assert retained and msg["sha256"] == v2_sha and msg["size"] == len(v2_bytes)
        assert msg["url"] == f"{base}/api/bundles/{v2_sha}"

        # A download cut after 1000 bytes resumes with Range + If-Range and yields the bundle exactly.
        code, headers, head = _get(msg["url"], {"Range": "bytes=0-999", "X-Edgekit-Device": canary_dev})
        assert code == 206 and len(head) == 1000 and headers["etag"] == f'"{v2_sha}"'
        code, _, tail = _get(msg["url"], {"Range": "bytes=1000-", "If-Range": f'"{v2_sha}"',
                                          "X-Edgekit-Device": canary_dev})
        assert code == 206 and hashlib.sha256(head + tail).hexdigest() == v2_sha

        # Beyond the concurrency cap (1 here): a download in progress holds the slot, the next gets 503.
        big_sha = hashlib.sha256(s["big"].read_bytes()).hexdigest()
        held = socket.socket()
        held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        held.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        held.sendall(f"GET /api/bundles/{big_sha} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
        code, headers, _ = _get(msg["url"])
        assert code == 503 and headers["retry-after"] == "5"
        held.close()
        wait_until(lambda: _get(msg["url"])[0] == 200, 30, "the slot to be released when the client went away")

        # fleet serve killed mid-rollout; meanwhile the canary installs and serves two windows of v2.
        server.kill()
        t = time.time()
        devices.send(*status(v2, canary_dev, fleet=FLEET, deployment=report(dep, v2, "installed", t, sha256=v2_sha),
                             requests=300))
        for w in range(2):
            devices.send(*window(v2, canary_dev, t + 1 + 60 * w, rng, fleet=FLEET, seq=10 + w))
        server.start()
        view = wait_until(lambda: (v := _cli(s, "rollout", dep))["state"] == "rolling" and v, 120,
                          "the restarted server to decide the canary and promote")
        figures = view["canary"]["figures"]
        assert view["canary"]["passed"] is True and figures["predicted_class"]["ok"] is True, figures
        # The canary compared with itself before the swap (3 windows of 300).
        assert figures["predicted_class"]["control"] == "the canary devices before the swap"
        assert figures["predicted_class"]["control_n"] == 900 and figures["install"]["installed"] == 1
        wait_until(lambda: early.actions() == {d: "install" for d in DEVICES}, 60, "every device's message")

        # Broker restarted with its persistence deleted: the server republishes what its database says.
        broker.stop()
        for f in broker.workdir.glob("*.db"):
            f.unlink()
        broker.start()
        after = Watcher(broker.port, "watch-after-restart")
        watchers.append(after)
        wait_until(lambda: after.actions() == {d: "install" for d in DEVICES}, 90,
                   "every deployment message published again after the broker lost them")
        later = Watcher(broker.port, "watch-later")  # the broker holds them again, retained
        watchers.append(later)
        wait_until(lambda: later.actions() == {d: "install" for d in DEVICES}, 30, "the retained messages")
        assert all(retained for _, retained in later.latest.values())

        for d in rest:
            devices.send(*status(v2, d, fleet=FLEET, deployment=report(dep, v2, "installed", time.time(),
                                                                        sha256=v2_sha)))
        view = wait_until(lambda: (v := _cli(s, "rollout", dep))["state"] == "done" and v, 90, "done")
        assert {d: v["version"] for d, v in view["devices"].items()} == {d: "1.1.0" for d in DEVICES}

        out = _cli(s, "rollout", dep, "--rollback")
        assert out["state"] == "rolled_back"
        v1_sha = hashlib.sha256(v1.path.read_bytes()).hexdigest()
        wait_until(lambda: after.actions() == {d: "rollback" for d in DEVICES}, 30, "rollback messages")
        assert {m["sha256"] for m, _ in after.latest.values()} == {v1_sha}
    finally:
        for w in watchers:
            w.close()
        devices.close()
