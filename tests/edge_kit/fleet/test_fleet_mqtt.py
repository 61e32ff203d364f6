"""`edge-kit fleet serve` against a real Mosquitto: ingest, dedup, bad input, kill -9 and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.uplink.wire import status_topic, summary_topic
from harness.fleetkit import DigitsBundle, sample_images, summary
from harness.processes import MosquittoBroker, cli_env, free_port, wait_for_port

pytestmark = pytest.mark.integration
FLEET = "itest"


def _publisher(broker: MosquittoBroker, client_id: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def _publish(c: mqtt.Client, topic: str, data: bytes, content_type: str | None, retain: bool = False) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if content_type:
        props.ContentType = content_type
    c.publish(topic, data, qos=1, retain=retain, properties=props).wait_for_publish(10)


def _metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


def _wait(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Server:
    """The real CLI in its own process group (so kill -9 takes its consumer processes too)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_kit", *self.args], env=cli_env(),
                                         stdout=out, stderr=out, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)


def _stored(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM windows").fetchone()[0])


def test_ingest_dedup_bad_input_and_restart_without_loss(tmp_path: Path, mosquitto: MosquittoBroker,
                                                         digits_bundle: DigitsBundle) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "fleet.db"
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("[drift]\nevaluate_every_seconds = 1\nmin_n = 50\n")
    server = Server(["fleet", "serve", "--broker", mosquitto.url, "--db", f"sqlite:///{db}", "--http",
                     f"127.0.0.1:{port}", "--fleet", FLEET, "--bundle", str(digits_bundle.path), "--config", str(cfg),
                     "--workers", "2"], tmp_path / "server.log")
    pub = _publisher(mosquitto, "devices")
    rng = np.random.default_rng(0)
    now = time.time()
    try:
        server.start()
        wait_for_port(port, timeout=60)
        # A retained status reaches the (non-shared) status subscription once the consumer is subscribed.
        _publish(pub, status_topic(FLEET, "dev0"), b'{"state": "online"}', "application/json", retain=True)
        _wait(lambda: any(d["device"] == "dev0" for d in json.load(urllib.request.urlopen(f"{base}/api/devices"))
                          ["devices"]), 60, "the consumer to subscribe")
        messages = []
        for w in range(10):
            for d in range(3):
                x, _ = sample_images(60, rng)
                messages.append((summary_topic(FLEET, f"dev{d}"),
                                 *summary(digits_bundle, f"dev{d}", now - 3000 + 60 * w, x, fleet=FLEET).to_bytes()))
        for m in messages:
            _publish(pub, *m)
        for m in messages[:5]:  # QoS-1 redeliveries
            _publish(pub, *m)
        _publish(pub, summary_topic(FLEET, "dev1"), b"{broken", "application/json")
        future = summary(digits_bundle, "dev1", now + 7200, sample_images(10, rng)[0], fleet=FLEET)
        _publish(pub, summary_topic(FLEET, "dev1"), *future.to_bytes(compress=False))
        _publish(pub, summary_topic(FLEET, "dev2"), *summary(digits_bundle, "dev1", now - 100, x,
                                                                  fleet=FLEET).to_bytes())  # spoofed topic
        key = 'edgekit_fleet_summaries_total{outcome="accepted"}'
        _wait(lambda: _metrics(base).get(key) == 30, 30, "30 accepted summaries")
        _wait(lambda: _metrics(base).get('edgekit_fleet_summaries_total{outcome="duplicate"}') == 5, 10, "dups")
        # The spoofed summary was published last: it may sit in a batch committed after the duplicates.
        _wait(lambda: _metrics(base).get('edgekit_fleet_rejected_total{kind="topic_mismatch"}') == 1, 10, "spoof")
        m = _metrics(base)
        assert m['edgekit_fleet_rejected_total{kind="malformed_json"}'] == 1
        assert m['edgekit_fleet_rejected_total{kind="future_window"}'] == 1
        assert m['edgekit_fleet_rejected_total{kind="topic_mismatch"}'] == 1
        _wait(lambda: any(r["channel"] == "in.mean" for r in json.load(
            urllib.request.urlopen(f"{base}/api/drift"))["results"]), 20, "a drift evaluation")
        assert _stored(db) == 30

        # kill -9 (no chance to clean up), publish while it is down, start again.
        server.kill()
        later = []
        for w in range(4):
            x, _ = sample_images(60, rng)
            later.append((summary_topic(FLEET, "dev0"),
                          *summary(digits_bundle, "dev0", now - 1200 + 60 * w, x, fleet=FLEET).to_bytes()))
        for msg in later:
            _publish(pub, *msg)
        assert _stored(db) == 30  # nothing stored was lost by the kill
        server.start()
        wait_for_port(port, timeout=60)
        _wait(lambda: _stored(db) == 34, 60, "the messages queued while the server was down")
        for msg in later[:2]:  # and duplicates after the restart are still dropped
            _publish(pub, *msg)
        time.sleep(1.0)
        assert _stored(db) == 34
        devices = json.load(urllib.request.urlopen(f"{base}/api/devices"))
        assert {d["device"] for d in devices["devices"]} == {"dev0", "dev1", "dev2"}
    finally:
        pub.loop_stop()
        pub.disconnect()
        server.kill(signal.SIGTERM)
    # A clean SIGTERM stop ends every process with exit 0.
    assert server.proc is not None and server.proc.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]


def test_serve_bad_usage_exits_2(tmp_path: Path, edge_kit_cli: Callable[..., object]) -> None:
    r = edge_kit_cli("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--db", f"sqlite:///{tmp_path}/f.db",
                     timeout=60)
    assert r.returncode == 2 and "--bundle" in r.stderr  # type: ignore[attr-defined]
    bad = tmp_path / "fleet.toml"
    bad.write_text("[drift]\nalpah = 0.05\n")
    r = edge_kit_cli("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--bundles", str(tmp_path),
                     "--config", str(bad), timeout=60)
    assert r.returncode == 2 and "drift.alpah" in r.stderr  # type: ignore[attr-defined]
    r = edge_kit_cli("fleet", "serve", "--broker", "http://x", "--bundles", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "mqtt://" in r.stderr  # type: ignore[attr-defined]
