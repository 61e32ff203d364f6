"""A local MQTT 5 broker for the demo: Mosquitto on 127.0.0.1, with its own config and persistence.

The agents and the fleet server speak MQTT 5 (persistent sessions with expiry, content-type
properties, shared subscriptions), so the broker must too. amqtt, the embedded Python broker one might
fall back to, speaks MQTT 3.1.1 only (0.12 refuses protocol level 5 at CONNECT), so it cannot stand
in; without Mosquitto the demo stops with a message saying how to install it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
        )
        self.process = ManagedProcess("mosquitto", [binary, "-c", str(config)], workdir)
        wait_for_port(self.port, 15, self.process)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop(timeout=10)
