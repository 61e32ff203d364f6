"""The Mosquitto ACL documented in docs/fleet.md, in a real broker: no device publishes as another."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_kit.fleet.ingest import ConsumerConfig, run_consumer
from edge_kit.fleet.settings import FleetSettings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import DigitsBundle, sample_images, summary
from harness.processes import REPO_ROOT, MosquittoBroker

pytestmark = pytest.mark.integration
FLEET = "acl"


def documented_acl() -> str:
    doc = (REPO_ROOT / "docs" / "fleet.md").read_text()
    match = re.search(r"<!-- acl -->\s*```\n(.*?)```", doc, re.S)
    assert match, "docs/fleet.md lost its ACL block"
    return match.group(1)


def _device(broker: MosquittoBroker, name: str, results: list[tuple[str, int]]) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.username_pw_set(name, f"pw-{name}")
    c.on_publish = lambda client, userdata, mid, reason, props: results.append((name, reason.value))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def test_device_cannot_publish_on_another_devices_topic(tmp_path: Path, digits_bundle: DigitsBundle) -> None:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwd = workdir / "passwd"
    for i, user in enumerate(["edgekit-fleet", "dev1", "dev2"]):
        subprocess.run(["mosquitto_passwd", *([] if i else ["-c"]), "-b", str(passwd), user, f"pw-{user}"],
                       check=True, capture_output=True)
    acl = workdir / "acl"
    acl.write_text(documented_acl())
    # Started as root, Mosquitto drops to user "mosquitto", which cannot read pytest's private tmp dirs.
    run_as = "user root\n" if os.geteuid() == 0 else ""
    broker = MosquittoBroker(workdir, f"{run_as}allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    broker.config.write_text(broker.config.read_text().replace("allow_anonymous true\n", ""))
    broker.start()
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    stop, ready = threading.Event(), threading.Event()
    cfg = ConsumerConfig(broker=f"mqtt://edgekit-fleet:pw-edgekit-fleet@127.0.0.1:{broker.port}",
                         db=storage.url, fleet=FLEET, group="g", worker=0, bundles=(str(digits_bundle.path),),
                         bundles_dir=None, settings=FleetSettings())
    consumer = threading.Thread(target=run_consumer, args=(cfg, stop, ready), daemon=True)
    results: list[tuple[str, int]] = []
    devices: list[mqtt.Client] = []
    try:
        consumer.start()
        assert ready.wait(20), "the fleet consumer did not subscribe"
        dev1 = _device(broker, "dev1", results)
        devices.append(dev1)
        rng = np.random.default_rng(0)
        props = Properties(PacketTypes.PUBLISH)
        now = time.time()
        own = summary(digits_bundle, "dev1", now - 600, sample_images(50, rng)[0], fleet=FLEET)
        props.ContentType = own.to_bytes()[1]
        dev1.publish(f"edgekit/{FLEET}/dev1/summary", own.to_bytes()[0], qos=1, properties=props).wait_for_publish(10)
        # dev1 forges a complete, self-consistent summary for dev2 on dev2's topic.
        forged = summary(digits_bundle, "dev2", now - 600, sample_images(50, rng)[0], fleet=FLEET)
        dev1.publish(f"edgekit/{FLEET}/dev2/summary", forged.to_bytes()[0], qos=1,
                     properties=props).wait_for_publish(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and storage.window_count() < 1:
            time.sleep(0.1)
        time.sleep(1.0)  # time for a forged message to arrive, had the broker let it through
        rows = storage.windows(digits_bundle.sha256, 0)
        assert [r[0] for r in rows] == ["dev1"]
        # Own summary acknowledged (0); the forged one refused with MQTT 5 PUBACK 135 "Not authorized".
        assert sorted(results) == [("dev1", 0), ("dev1", 135)], results
        assert not any(k.startswith("rejected:") for k in storage.counters())  # stopped at the broker
    finally:
        for c in devices:
            c.loop_stop()
            c.disconnect()
        stop.set()
        consumer.join(10)
        storage.close()
        broker.stop()
