"""A poison summary among good ones, through a real Mosquitto into a running `edge-kit fleet serve`."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_fleet_mqtt import Server, _publish, _publisher, _stored, _wait

from harness.fleetkit import OPERATOR_TOKEN, DigitsBundle, sample_images, summary
from harness.processes import MosquittoBroker, free_port, wait_for_port

pytestmark = pytest.mark.integration
FLEET = "poison"


def _metrics(base: str) -> dict[str, float]:
    req = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if ln and not ln.startswith("#")}


def test_poison_summaries_are_counted_and_the_good_ones_stored(tmp_path: Path, mosquitto: MosquittoBroker,
                                                                digits_bundle: DigitsBundle) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "fleet.db"
    token = tmp_path / "token"
    token.write_text(OPERATOR_TOKEN + "\n")
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("[ingest]\nbatch_size = 64\n")
    server = Server(["fleet", "serve", "--broker", mosquitto.url, "--db", f"sqlite:///{db}", "--http",
                     f"127.0.0.1:{port}", "--fleet", FLEET, "--bundle", str(digits_bundle.path), "--config", str(cfg),
                     "--token-file", str(token)], tmp_path / "server.log")
    pub = _publisher(mosquitto, "poisoner")
    rng = np.random.default_rng(3)
    now = time.time()
    try:
        server.start()
        wait_for_port(port, timeout=60)
        _publish(pub, f"edgekit/{FLEET}/dev0/status", b'{"state": "online"}', "application/json", retain=True)
        _wait(lambda: _metrics(base).get('edgekit_fleet_devices{state="online"}') == 1, 60, "the consumer")
        messages = []
        for w in range(6):
            for d in range(3):
                x, _ = sample_images(40, rng)
                data, _ = summary(digits_bundle, f"dev{d}", now - 3000 + 60 * w, x, fleet=FLEET).to_bytes(
                    compress=False)
                messages.append((f"edgekit/{FLEET}/dev{d}/summary", json.loads(data)))
        # Two poison messages in the middle of the good ones, all published before the consumer's
        # batch fills: they share a batch with good windows.
        seq_overflow = json.loads(json.dumps(messages[4][1]))
        seq_overflow["window"].update(seq=2**64 - 1, start=now - 100, end=now - 50)
        nul_name = json.loads(json.dumps(messages[5][1]))
        nul_name["model"]["name"] = "digits\x00"
        nul_name["window"].update(start=now - 90, end=now - 40)
        batch = [*messages[:9], (messages[4][0], seq_overflow), (messages[5][0], nul_name), *messages[9:]]
        for topic, payload in batch:
            _publish(pub, topic, json.dumps(payload).encode(), "application/json")
        _wait(lambda: _stored(db) == len(messages), 30, f"{len(messages)} good windows stored")
        _wait(lambda: _metrics(base).get('edgekit_fleet_rejected_total{kind="window"}') == 1, 10, "the seq rejection")
        m = _metrics(base)
        assert m['edgekit_fleet_rejected_total{kind="strings"}'] == 1
        assert m['edgekit_fleet_summaries_total{outcome="accepted"}'] == len(messages)
        # No redelivery loop: nothing more arrives, nothing more is counted.
        time.sleep(3.0)
        counters = {k: v for k, v in _metrics(base).items() if k.startswith(("edgekit_fleet_summaries_total",
                                                                              "edgekit_fleet_rejected_total"))}
        assert counters == {k: v for k, v in m.items() if k in counters} and len(counters) >= 4
        assert _stored(db) == len(messages)
    finally:
        pub.loop_stop()
        pub.disconnect()
        server.kill(signal.SIGTERM)
    assert server.proc is not None and server.proc.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
