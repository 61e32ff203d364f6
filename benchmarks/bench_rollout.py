"""A rollout to many simulated devices: time to done, bytes served, the server's CPU and memory.

Every simulated device speaks the agent's deployment protocol with the agent's own code and its own
folder: it receives its retained deployment message from a real Mosquitto
(`device_agent.deploy.message.parse_deployment_message`), downloads the bundle with the agent's
resumable client (`device_agent.deploy.download.download`: Range, sha256, 503 + Retry-After), verifies
the signature and manifest against the public key (`device_agent.bundle.format.read_bundle`), and
publishes `downloading` / `verifying` / `installed` in the `deployment` block of its retained status
(`DeploymentReport`). No ONNX Runtime: the self-test and swap are what one real agent does, measured
by the agent's own tests and benchmarks.

The server is the stand-in `harness.bundle_server` (same download contract as the fleet's
`GET /api/bundles/<sha256>`: ETag, Range, a cap on concurrent downloads answered 503 + Retry-After) in
a process of its own, so its CPU time and peak memory are its own. It paces each response to `--link`
bytes/s, standing in for the devices' field links (loopback would make every download instant and the
cap on concurrent downloads would never bite). `--server fleet` is not offered:
a rollout through `edge-kit fleet serve` also runs its canary stage, which needs windows of real
summaries; the figures here are for the distribution itself.

    python benchmarks/bench_rollout.py [--devices 1000] [--concurrency 64] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from benchmarks.common import print_table, write_result  # noqa: E402
from device_agent.bundle.format import read_bundle  # noqa: E402
from device_agent.deploy.download import DownloadFailed, DownloadPolicy, DownloadStats, download  # noqa: E402
from device_agent.deploy.message import (  # noqa: E402
    DOWNLOADING,
    FAILED,
    INSTALLED,
    VERIFYING,
    DeploymentMessage,
    DeploymentReport,
    encode_deployment_message,
    parse_deployment_message,
)
from device_agent.host import host_info  # noqa: E402
from device_agent.uplink.wire import deployment_topic, parse_topic, status_topic  # noqa: E402
from harness.bundles import make_bundle  # noqa: E402
from harness.processes import MosquittoBroker  # noqa: E402

FLEET = "bench"
PUBLISHERS = 8  # MQTT connections the simulated devices share for their status messages


def _client(port: int, name: str) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


class Fleet:
    """The simulated devices: their folders, their reports, and when each finished."""

    def __init__(self, root: Path, port: int, public_key: Any, devices: int) -> None:
        self.root, self.public_key = root, public_key
        self.publishers = [_client(port, f"bench-status-{i}") for i in range(PUBLISHERS)]
        self.finished: dict[str, tuple[str, float]] = {}
        self.received = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        self.devices = devices
        self.threads: list[threading.Thread] = []
        self.policy = DownloadPolicy(timeout=30, give_up_after=3600, backoff_min=0.5, backoff_max=10)

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = parse_topic(msg.topic)
        if parts is None or not msg.payload:
            return
        message = parse_deployment_message(bytes(msg.payload))  # the agent's parser
        thread = threading.Thread(target=self.device, args=(parts[1], message), daemon=True)
        self.threads.append(thread)
        thread.start()

    def report(self, device: str, message: DeploymentMessage, step: str, have: int, reason: str | None = None) -> None:
        block = DeploymentReport(message.deployment, message.version, message.sha256, step, reason, have, time.time())
        doc = {"state": "online", "fleet": FLEET, "device": device, "at": time.time(), "deployment": block.to_dict()}
        publisher = self.publishers[hash(device) % PUBLISHERS]
        publisher.publish(status_topic(FLEET, device), json.dumps(doc).encode(), qos=1, retain=True)

    def device(self, device: str, message: DeploymentMessage) -> None:
        """One device acting on its message, as `DeploymentUpdater` does up to the self-test."""
        assert message.url is not None and message.size is not None
        stats = DownloadStats()
        self.report(device, message, DOWNLOADING, 0)
        try:
            staged = download(message.url, sha256=message.sha256, size=message.size,
                              staging=self.root / device / "staging", device_id=device,
                              max_bytes=64 * 1024**2, policy=self.policy, stats=stats)
            self.report(device, message, VERIFYING, message.size)
            bundle = read_bundle(staged, public_key=self.public_key, require_signature=True)
            assert (bundle.name, bundle.version) == (message.name, message.version)
            step, reason = INSTALLED, None
        except (DownloadFailed, AssertionError) as exc:
            step, reason = FAILED, str(exc)
        self.report(device, message, step, message.size, reason)
        with self.lock:
            self.finished[device] = (step, time.monotonic())
            self.received += stats.received
            self.requests += stats.requests
            if len(self.finished) == self.devices:
                self.all_done.set()

    def close(self) -> None:
        for client in self.publishers:
            client.loop_stop()
            client.disconnect()


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(devices: int, concurrency: int, retry_after: int, link: int, tmp: Path) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp / "bundles", seed=1, version="2.0.0", signing_key=key)
    size = bundle.stat().st_size
    (tmp / "broker").mkdir()
    broker = MosquittoBroker(tmp / "broker", "max_connections -1\nmax_inflight_messages 0\n")
    broker.start()
    server = subprocess.Popen(
        [sys.executable, "-m", "harness.bundle_server", str(bundle), "--max-concurrent", str(concurrency),
         "--retry-after", str(retry_after), "--throttle", str(link)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert server.stdout is not None
    port = int(server.stdout.readline().split()[1])
    fleet = Fleet(tmp / "devices", broker.port, key.public_key(), devices)
    radio = _client(broker.port, "bench-devices")
    radio.on_message = fleet.on_message
    try:
        bundle_sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
        url = f"http://127.0.0.1:{port}/api/bundles/{bundle_sha}"
        cpu0 = _proc_cpu_seconds(server.pid)
        started = time.monotonic()
        # The fleet's side: one retained message per device (as `fleet serve` publishes them).
        announcer = _client(broker.port, "bench-fleet")
        for i in range(devices):
            message = DeploymentMessage("bench-1", "install", "digits", "2.0.0", bundle_sha, size, url, time.time())
            announcer.publish(deployment_topic(FLEET, f"dev-{i:05d}"), encode_deployment_message(message), qos=1,
                              retain=True)
        radio.subscribe(deployment_topic(FLEET, "+"), qos=1)
        if not fleet.all_done.wait(3600):
            raise RuntimeError(f"only {len(fleet.finished)} of {devices} devices finished in an hour")
        seconds = time.monotonic() - started
        cpu = _proc_cpu_seconds(server.pid) - cpu0
        rss = _proc_peak_rss_mb(server.pid)
        announcer.loop_stop()
        announcer.disconnect()
    finally:
        radio.loop_stop()
        radio.disconnect()
        fleet.close()
        server.terminate()
        served_line = server.communicate(timeout=30)[0].strip().splitlines()
        broker.stop()
    served = json.loads(served_line[-1]) if served_line else {}
    installed = sum(1 for step, _ in fleet.finished.values() if step == INSTALLED)
    ends = sorted(t for _, t in fleet.finished.values())
    return {
        "devices": devices, "concurrency_cap": concurrency, "link_bytes_per_s": link, "bundle_bytes": size,
        "installed": installed, "failed": devices - installed,
        "time_to_done_s": round(seconds, 2),
        "time_to_half_s": round(ends[len(ends) // 2] - started, 2),
        "bytes_served": served.get("bytes_sent"), "bytes_received": fleet.received,
        "served_over_ideal": round(served.get("bytes_sent", 0) / (devices * size), 4),
        "download_requests": served.get("requests"), "answered_503": served.get("answered_503"),
        "peak_concurrent": served.get("peak_concurrent"),
        "server_cpu_s": round(cpu, 2), "server_cpu_share": round(cpu / seconds, 3),
        "server_peak_rss_mb": round(rss, 1),
        "devices_per_s": round(devices / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64, help="the server's cap on concurrent downloads")
    parser.add_argument("--retry-after", type=int, default=1, help="seconds the server asks a refused device to wait")
    parser.add_argument("--link", type=int, default=250_000,
                        help="bytes/s of each device's link, paced by the server (default 250000: 2 Mbit/s)")
    parser.add_argument("--quick", action="store_true", help="100 devices")
    args = parser.parse_args()
    devices = 100 if args.quick else args.devices
    machine = host_info(("numpy", "paho-mqtt"))
    print(f"machine: {machine['cpu']} ({machine['cores']} cores, {machine['int8_isa']}), {machine['platform']}")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        figures = run(devices, args.concurrency, args.retry_after, args.link, Path(tmp))
    print_table([figures])
    if not args.quick:
        print(write_result("rollout", figures, server="harness.bundle_server (stand-in for fleet serve's "
                                                  "GET /api/bundles/<sha256>)"))


if __name__ == "__main__":
    main()
