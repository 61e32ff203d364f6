"""Against a real Mosquitto on 127.0.0.1: payload keys, broker outages, kill -9, credentials, hot update."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from harness.bundles import digits_like_inputs
from harness.processes import MosquittoBroker
from tests.helpers.mqtt import AgentProcess, Subscriber, wait_until
from tests.helpers.tls_certs import make_pki

pytestmark = pytest.mark.integration

FAST = "[agent]\nwatch_interval = 0.2\n[mqtt]\nreconnect_min = 0.2\nreconnect_max = 1.0\n"


def _args(bundle: Path, broker: MosquittoBroker, spool: Path, device: str = "dev-1") -> list[str]:
    return ["--bundle", str(bundle), "--broker", broker.url, "--device-id", device, "--fleet", "test",
            "--spool", str(spool), "--window-seconds", "1"]


def test_summaries_and_status_arrive_with_the_documented_keys(mosquitto: MosquittoBroker, bundle_v1: Path,
                                                              tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, *_args(bundle_v1, mosquitto, tmp_path / "spool.db"), config=FAST)
    try:
        agent.post("/predict", {"inputs": digits_like_inputs(7).tolist()})
        wait_until(lambda: sub.summaries, 15, "a summary")
        payload, content_type = sub.summaries[0]
        assert content_type == "application/json+zlib"
        assert {"schema", "fleet", "device", "model", "window", "n", "channels"} <= set(payload)
        assert payload["schema"] == "edgekit.summary/1" and payload["n"] == 7
        assert (payload["fleet"], payload["device"]) == ("test", "dev-1")
        assert set(payload["model"]) == {"name", "version", "sha256"}
        assert set(payload["window"]) == {"start", "end", "seq"}
        # `disp` (the per-window dispersion signal, docs/architecture.md section 6) is optional in the schema.
        assert all(set(c) - {"disp"} == {"counts", "min", "max", "sum", "sumsq"} for c in payload["channels"].values())
        wait_until(lambda: any(s["state"] == "online" for s, _ in sub.status), 10, "online status")
        wait_until(lambda: agent.status()["spool"]["pending"] == 0, 10, "spool drained")
    finally:
        assert agent.stop() == 0
    wait_until(lambda: sub.status and sub.status[-1][0]["state"] == "offline", 10, "offline status")
    sub.close()
    # The last status is retained: a late subscriber learns the device is offline.
    late = Subscriber(mosquitto.port, topic="edgekit/test/dev-1/status", client_id="late")
    try:
        wait_until(lambda: late.status, 10, "retained status")
        assert late.status[-1] == (late.status[-1][0], True) and late.status[-1][0]["state"] == "offline"
    finally:
        late.close()


def test_a_broker_outage_loses_nothing_and_duplicates_nothing(mosquitto: MosquittoBroker, bundle_v1: Path,
                                                               tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, *_args(bundle_v1, mosquitto, tmp_path / "spool.db"), config=FAST)
    stop_feeding = threading.Event()
    sent = [0]

    def feed() -> None:
        x = digits_like_inputs(3).tolist()
        while not stop_feeding.is_set():
            agent.post("/predict", {"inputs": x})
            sent[0] += 3
            stop_feeding.wait(0.1)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        wait_until(lambda: sub.summaries, 15, "first summary")
        mosquitto.stop()
        wait_until(lambda: agent.status()["spool"]["pending"] >= 2, 20, "windows spooled during the outage")
        mosquitto.start()
        wait_until(lambda: agent.status().get("connected"), 20, "agent reconnected")
    finally:
        stop_feeding.set()
        feeder.join()
    try:
        agent_status = wait_until(
            lambda: (s := agent.status())["spool"]["pending"] == 0 and s["window"]["open_n"] == 0 and s, 20,
            "every window closed and acknowledged")
        closed = agent_status["counters"]["windows_closed"]
        wait_until(lambda: len(sub.unique_windows()) == closed, 20, f"{closed} distinct windows at the subscriber")
        windows = sub.unique_windows()
        # Exactly once per idempotency key: every inference is counted once after dropping duplicates.
        assert sum(p["n"] for p in windows.values()) == agent_status["counters"]["predictions"] == sent[0]
        assert "disconnected" in agent.log or "connection lost" in agent.log
    finally:
        agent.stop()
        sub.close()


def test_a_window_spooled_before_kill_9_arrives_after_restart(mosquitto: MosquittoBroker, bundle_v1: Path,
                                                               tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    mosquitto.stop()  # nothing can be published: windows stay in the spool
    agent = AgentProcess(tmp_path, *_args(bundle_v1, mosquitto, spool), config=FAST)
    try:
        agent.post("/predict", {"inputs": digits_like_inputs(5).tolist()})
        wait_until(lambda: agent.status()["spool"]["pending"] >= 1, 15, "a spooled window")
        agent.kill9()
    finally:
        agent.stop()
    with sqlite3.connect(spool) as db:
        spooled_keys = {row[0] for row in db.execute("SELECT key FROM windows")}
    assert spooled_keys

    mosquitto.start()
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, *_args(bundle_v1, mosquitto, spool), config=FAST)
    try:
        wait_until(lambda: sub.summaries, 20, "the spooled window")
        received = {f"{d}|{sha}|{start!r}" for d, sha, start in sub.unique_windows()}
        assert spooled_keys <= received
        assert sum(p["n"] for p in sub.unique_windows().values()) == 5
    finally:
        agent.stop()
        sub.close()


def test_refused_credentials_are_logged_and_the_agent_keeps_serving(bundle_v1: Path, tmp_path: Path) -> None:
    broker_dir = tmp_path / "auth-broker"
    broker_dir.mkdir()
    passwords = broker_dir / "passwd"
    passwords.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "dev", "right"], check=True, capture_output=True)
    as_root = "user root\n" if os.geteuid() == 0 else ""  # see the mosquitto fixture in conftest.py
    broker = MosquittoBroker(broker_dir, extra_config=f"{as_root}password_file {passwords}\n")
    broker.config.write_text(broker.config.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    agent = None
    try:
        (tmp_path / "pw").write_text("wrong\n")
        config = FAST + f'username = "dev"\npassword_file = "{tmp_path / "pw"}"\n'
        agent = AgentProcess(tmp_path, *_args(bundle_v1, broker, tmp_path / "s.db"), config=config)
        agent.post("/predict", {"inputs": digits_like_inputs(2).tolist()})
        wait_until(lambda: "broker refused the connection" in agent.log, 15, "a clear log line")
        wait_until(lambda: agent.status()["spool"]["pending"] >= 1, 10, "the window spooled")
        assert agent.status()["connected"] is False
        assert "refused" in agent.status()["broker_error"]
        assert agent.post("/predict", {"inputs": digits_like_inputs(1).tolist()})["predictions"]
        agent.stop()

        (tmp_path / "pw").write_text("right\n")
        agent = AgentProcess(tmp_path, *_args(bundle_v1, broker, tmp_path / "s.db"), config=config)
        # Connected, but nobody subscribes yet: the broker answers "no matching subscribers" and the
        # window stays spooled (it would be lost otherwise); it leaves once a subscriber is there.
        wait_until(lambda: "no subscriber yet" in agent.log, 15, "the window held back for a subscriber")
        assert agent.status()["connected"] is True and agent.status()["spool"]["pending"] >= 1
        sub = Subscriber(broker.port, user=("dev", "right"))
        try:
            wait_until(lambda: agent.status()["spool"]["pending"] == 0, 15, "spool drained once subscribed")
            assert sub.summaries
        finally:
            sub.close()
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()


def test_hot_update_keeps_serving_through_garbage_and_swaps_a_good_bundle(
        mosquitto: MosquittoBroker, bundle_v1: Path, bundle_v2: Path, tmp_path: Path, keypair) -> None:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copy(bundle_v1, bundles / "a.edgebundle")
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, *_args(bundles, mosquitto, tmp_path / "s.db"), "--pubkey", str(keypair[1]),
                         config=FAST)
    try:
        v1 = agent.status()["model"]
        (bundles / "b.edgebundle").write_bytes(b"garbage " * 1000)
        update = wait_until(lambda: agent.status()["update"], 10, "the refused update")
        assert update["ok"] is False and "b.edgebundle" in update["error"]
        assert agent.status()["model"] == v1
        assert agent.post("/predict", {"inputs": digits_like_inputs(1).tolist()})["model"] == v1
        wait_until(lambda: any((s.get("update") or {}).get("ok") is False for s, _ in sub.status), 10,
                   "the refusal on the status topic")

        shutil.copy(bundle_v2, bundles / "c.edgebundle.tmp")
        (bundles / "c.edgebundle.tmp").rename(bundles / "c.edgebundle")  # atomic drop-in
        wait_until(lambda: agent.status()["model"]["version"] == "2.0.0", 10, "the new bundle")
        assert agent.post("/predict", {"inputs": digits_like_inputs(1).tolist()})["model"]["version"] == "2.0.0"
    finally:
        agent.stop()
        sub.close()


def test_tls_with_a_client_certificate(bundle_v1: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    broker_dir = tmp_path / "tls-broker"
    broker_dir.mkdir()
    as_root = "user root\n" if os.geteuid() == 0 else ""
    broker = MosquittoBroker(broker_dir, extra_config=(
        f"{as_root}cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server_key']}\n"
        "require_certificate true\n"))
    broker.start()
    agent = None
    try:
        tls = (FAST + f'ca_certs = "{pki["ca"]}"\ncertfile = "{pki["client"]}"\nkeyfile = "{pki["client_key"]}"\n')
        args = _args(bundle_v1, broker, tmp_path / "s.db")
        args[args.index("--broker") + 1] = f"mqtts://127.0.0.1:{broker.port}"
        agent = AgentProcess(tmp_path, *args, config=tls)
        sub = Subscriber(broker.port, tls=(str(pki["ca"]), str(pki["client"]), str(pki["client_key"])))
        try:
            agent.post("/predict", {"inputs": digits_like_inputs(3).tolist()})
            wait_until(lambda: agent.status()["connected"], 15, "a TLS connection")
            wait_until(lambda: agent.status()["spool"]["acked"] >= 1, 15, "a window acknowledged over TLS")
        finally:
            sub.close()
        agent.stop()

        # Without the client certificate the broker refuses the handshake: logged, still serving.
        no_cert = FAST + f'ca_certs = "{pki["ca"]}"\n'
        agent = AgentProcess(tmp_path, *args, config=no_cert)
        wait_until(lambda: "closed the connection before accepting it" in agent.log, 15, "a clear log line")
        assert agent.post("/predict", {"inputs": digits_like_inputs(1).tolist()})["predictions"]
        assert agent.status()["connected"] is False
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()
