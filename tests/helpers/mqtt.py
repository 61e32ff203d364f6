"""A real `edge-agent run` process and a paho subscriber, for the Mosquitto integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.monitoring.summary import WindowSummary
from harness.processes import cli_env, free_port


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class AgentProcess:
    """`python -m device_agent run ...` with an HTTP port; always stopped by the caller's finally."""

    def __init__(self, workdir: Path, *args: str, config: str | None = None) -> None:
        self.port = free_port()
        self.log_path = workdir / f"agent-{self.port}.log"
        argv = [sys.executable, "-m", "device_agent", "run", "--http", f"127.0.0.1:{self.port}", *args]
        if config is not None:
            cfg = workdir / f"agent-{self.port}.toml"
            cfg.write_text(config)
            argv += ["--config", str(cfg)]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=cli_env(), stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._healthy, 30, f"edge-agent on port {self.port}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"agent did not start:\n{self.log}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def post(self, path: str, doc: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(doc).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/status", timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


class Subscriber:
    """paho subscriber with a persistent session, collecting summaries (decoded) and status messages."""

    def __init__(self, port: int, topic: str = "edgekit/#", client_id: str | None = None, *,
                 user: tuple[str, str] | None = None, tls: tuple[str, str, str] | None = None) -> None:
        """`user` = (name, password); `tls` = (CA, client certificate, client key) PEM paths."""
        self.summaries: list[tuple[dict[str, Any], str]] = []  # (payload, content type)
        self.status: list[tuple[dict[str, Any], bool]] = []  # (payload, retained)
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-sub-{os.getpid()}-{port}", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        if user is not None:
            self.client.username_pw_set(*user)
        if tls is not None:
            self.client.tls_set(ca_certs=tls[0], certfile=tls[1], keyfile=tls[2])
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "subscriber connected")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        content_type = getattr(msg.properties, "ContentType", None)
        if msg.topic.endswith("/summary"):
            summary = WindowSummary.from_bytes(msg.payload, content_type)  # checks the payload structurally
            payload = summary.to_payload() if summary else {}
            with self.lock:
                self.summaries.append((payload, str(content_type)))
        elif msg.topic.endswith("/status"):
            with self.lock:
                self.status.append((json.loads(msg.payload), bool(msg.retain)))

    def unique_windows(self) -> dict[tuple[str, str, float], dict[str, Any]]:
        """Summaries deduplicated by the idempotency key (device, model sha256, window start)."""
        with self.lock:
            return {(p["device"], p["model"]["sha256"], p["window"]["start"]): p for p, _ in self.summaries}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
