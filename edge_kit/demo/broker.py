"""A local MQTT 5 broker for the demo: Mosquitto on 127.0.0.1, with its own config and persistence.

The agents and the fleet server speak MQTT 5 (persistent sessions with expiry, content-type
properties, shared subscriptions), so the broker must too. amqtt, the embedded Python broker one might
fall back to, speaks MQTT 3.1.1 only (0.12 refuses protocol level 5 at CONNECT), so it cannot stand
in; without Mosquitto the demo stops with a message saying how to install it.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edge_kit.demo.processes import ManagedProcess, free_port, wait_for_port
from edge_kit.errors import UsageError

INSTALL_HINT = ("install it with `make system-deps` (Debian/Ubuntu: apt-get install mosquitto) or your package "
                "manager; the embedded amqtt broker speaks MQTT 3.1.1 only and the agents need MQTT 5")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


class Broker:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise UsageError("the fleet demo needs the Mosquitto MQTT broker", hint=INSTALL_HINT)
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 5\n"
            "max_queued_messages 100000\n"
            "sys_interval 1\n"  # $SYS figures every second: wait_for_subscriptions reads them
        )
        self.process = ManagedProcess("mosquitto", [binary, "-c", str(config)], workdir)
        wait_for_port(self.port, 15, self.process)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def wait_for_subscriptions(self, count: int, timeout: float) -> None:
        """Until the broker holds `count` subscriptions (e.g. the fleet server's), read from Mosquitto's $SYS.

        A QoS-1 message published to a topic nobody has subscribed to yet is dropped by the broker, so
        devices must not publish before the fleet server's consumer has subscribed once (from then on its
        persistent session queues them).
        """
        import paho.mqtt.client as mqtt

        seen = threading.Event()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            try:
                if int(msg.payload) >= count:
                    seen.set()
            except ValueError:
                pass

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgekit-demo-probe",
                             protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/subscriptions/count", 0)
        client.on_message = on_message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            deadline = time.monotonic() + timeout
            while not seen.wait(0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the broker did not see {count} subscription(s) within {timeout:.0f} s")
        finally:
            client.loop_stop()
            client.disconnect()

    def stop(self) -> None:
        self.process.stop(timeout=10)
