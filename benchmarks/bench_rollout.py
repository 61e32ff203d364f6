"""A rollout to many simulated devices: time to done, bytes served, the server's CPU and memory.

Every simulated device speaks the agent's deployment protocol with the agent's own code and its own
folder: it receives its retained deployment message from a real Mosquitto
(`device_agent.deploy.message.parse_deployment_message`), downloads the bundle with the agent's
resumable client (`device_agent.deploy.download.download`: Range, sha256, 503 + Retry-After), verifies
the signature and manifest against the public key (`device_agent.bundle.format.read_bundle`), and
publishes `downloading` / `verifying` / `installed` in the `deployment` block of its retained status
(`DeploymentReport`). No ONNX Runtime: the self-test and swap are what one real agent does, measured
by the agent's own tests and benchmarks.

Two servers, each in processes of its own so their CPU time and peak memory are their own:

- `--server fleet` (default): a real `edge-kit fleet serve` (its consumers, database, MQTT publisher and
  `GET /api/bundles/<sha256>` with its cap on concurrent downloads). The benchmark creates the
  deployment through the API (one canary) and promotes it at once as an operator would (the canary's
  model-aware decision needs windows of real summaries, which is the agent tests' and the demo's
  business); "done" is when the fleet's own rollout state says `done`, i.e. it recorded every device's
  `installed` from their status messages.
- `--server standin`: `harness.bundle_server`, the same download contract in a small threaded
  `http.server`, which can pace each response to `--link` bytes/s, standing in for the devices' field
  links (on loopback every download is otherwise instant and the cap would hardly bite). The benchmark
  publishes the retained messages itself.

    python benchmarks/bench_rollout.py [--server fleet|standin] [--devices 1000] [--concurrency 64] [--quick]
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
import urllib.request
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
        self.started: set[str] = set()
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
        with self.lock:
            if parts[1] in self.started:  # the same retained message again (the fleet republishes on connect)
                return
            self.started.add(parts[1])
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


def _group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (the fleet server and its consumer processes)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of /proc/<pid>/stat: the process group
            pids.append(int(stat.parent.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), 0)
    return total / 1024


def _http(method: str, url: str, token: str | None = None, body: Any = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method=method),
                                timeout=120) as resp:
        return dict(json.loads(resp.read()))


class StandIn:
    """harness.bundle_server in its own process; the benchmark publishes the retained messages."""

    name = "harness.bundle_server (stand-in with the download contract of fleet serve)"

    def __init__(self, tmp: Path, bundle: Path, concurrency: int, retry_after: int, link: int,
                 broker: MosquittoBroker) -> None:
        self.broker, self.bundle = broker, bundle
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.bundle_server", str(bundle), "--max-concurrent", str(concurrency),
             "--retry-after", str(retry_after), "--throttle", str(link)], stdout=subprocess.PIPE, text=True,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().split()[1])
        self.served: dict[str, Any] = {}

    def deploy(self, devices: list[str], sha: str, size: int) -> None:
        url = f"http://127.0.0.1:{self.port}/api/bundles/{sha}"
        announcer = _client(self.broker.port, "bench-fleet")
        infos = [announcer.publish(deployment_topic(FLEET, d), encode_deployment_message(
            DeploymentMessage("bench-1", "install", "digits", "2.0.0", sha, size, url, time.time())), qos=1,
            retain=True) for d in devices]
        for info in infos:
            info.wait_for_publish(60)
        announcer.loop_stop()
        announcer.disconnect()

    def done(self) -> bool:
        return True  # the devices' own reports are the measure

    def stop(self) -> None:
        self.proc.terminate()
        lines = self.proc.communicate(timeout=30)[0].strip().splitlines()
        self.served = json.loads(lines[-1]) if lines else {}


class FleetServe:
    """A real `edge-kit fleet serve`: the deployment is created and promoted through its API."""

    name = "edge-kit fleet serve"

    def __init__(self, tmp: Path, bundle: Path, concurrency: int, broker: MosquittoBroker) -> None:
        from harness.fleetkit import OPERATOR_TOKEN
        from harness.processes import free_port, wait_for_port

        self.token = OPERATOR_TOKEN
        (tmp / "token").write_text(self.token + "\n")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / "fleet.log").open("wb")
        argv = [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", broker.url, "--db",
                f"sqlite:///{tmp}/fleet.db", "--http", f"127.0.0.1:{self.port}", "--fleet", FLEET, "--bundles",
                str(bundle.parent), "--token-file", str(tmp / "token")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        usage = subprocess.run([*argv[:5], "--help"], capture_output=True, text=True, env=env, cwd=ROOT).stdout
        self.concurrency: int | None = concurrency if "--download-concurrency" in usage else None
        if self.concurrency is not None:
            argv += ["--download-concurrency", str(concurrency)]
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT, env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        try:
            wait_for_port(self.port, timeout=120)
        except TimeoutError:
            self.stop()
            raise RuntimeError("fleet serve did not start:\n" + (tmp / "fleet.log").read_text()[-2000:]) from None
        self.dep_id = ""
        self.served: dict[str, Any] = {}

    def deploy(self, devices: list[str], sha: str, size: int) -> None:
        view = _http("POST", f"{self.base}/api/deployments", self.token,
                     {"bundle_sha256": sha, "devices": devices, "canary": 1, "canary_windows": 1,
                      "auto_promote": False})
        self.dep_id = str(view["deployment"])
        _http("POST", f"{self.base}/api/deployments/{self.dep_id}/promote", self.token, {})

    def done(self) -> bool:
        return _http("GET", f"{self.base}/api/deployments/{self.dep_id}", self.token)["state"] == "done"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def run(server_kind: str, devices: int, concurrency: int, retry_after: int, link: int, tmp: Path) -> dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    bundle = make_bundle(tmp / "bundles", seed=1, version="2.0.0", signing_key=key)
    size = bundle.stat().st_size
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    (tmp / "broker").mkdir()
    broker = MosquittoBroker(tmp / "broker", "max_connections -1\nmax_inflight_messages 0\n")
    broker.start()
    server: StandIn | FleetServe = (FleetServe(tmp, bundle, concurrency, broker) if server_kind == "fleet" else
                                    StandIn(tmp, bundle, concurrency, retry_after, link, broker))
    fleet = Fleet(tmp / "devices", broker.port, key.public_key(), devices)
    radio = _client(broker.port, "bench-devices")
    radio.on_message = fleet.on_message
    radio.subscribe(deployment_topic(FLEET, "+"), qos=1)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    try:
        pids = _group_pids(server.proc.pid)
        cpu0 = _cpu_seconds(pids)
        started = time.monotonic()
        server.deploy(ids, sha, size)
        if not fleet.all_done.wait(3600):
            raise RuntimeError(f"only {len(fleet.finished)} of {devices} devices finished in an hour")
        devices_done = time.monotonic() - started
        deadline = time.monotonic() + 600
        while not server.done():
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not reach done within 10 minutes of the last device")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        pids = _group_pids(server.proc.pid)
        cpu = _cpu_seconds(pids) - cpu0
        rss = _peak_rss_mb(pids)
    finally:
        radio.loop_stop()
        radio.disconnect()
        fleet.close()
        server.stop()
        broker.stop()
    installed = sum(1 for step, _ in fleet.finished.values() if step == INSTALLED)
    ends = sorted(t for _, t in fleet.finished.values())
    return {
        "server": server_kind, "devices": devices,
        "concurrency_cap": getattr(server, "concurrency", concurrency) or "server default",
        "link_bytes_per_s": link if server_kind == "standin" else None, "bundle_bytes": size,
        "installed": installed, "failed": devices - installed,
        "time_to_done_s": round(seconds, 2), "last_device_s": round(devices_done, 2),
        "time_to_half_s": round(ends[len(ends) // 2] - started, 2),
        "bytes_received": fleet.received, "received_over_ideal": round(fleet.received / (devices * size), 4),
        "bytes_served": server.served.get("bytes_sent"), "download_requests": fleet.requests,
        "answered_busy": fleet.requests - devices, "peak_concurrent": server.served.get("peak_concurrent"),
        "server_processes": len(pids), "server_cpu_s": round(cpu, 2), "server_cpu_share": round(cpu / seconds, 3),
        "server_peak_rss_mb": round(rss, 1), "devices_per_s": round(devices / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("fleet", "standin"), default="fleet")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64, help="the server's cap on concurrent downloads")
    parser.add_argument("--retry-after", type=int, default=1,
                        help="standin: seconds the server asks a refused device to wait (fleet serve says 5)")
    parser.add_argument("--link", type=int, default=250_000,
                        help="standin: bytes/s of each device's link, paced by the server (default 2 Mbit/s)")
    parser.add_argument("--quick", action="store_true", help="100 devices")
    args = parser.parse_args()
    devices = 100 if args.quick else args.devices
    machine = host_info(("numpy", "paho-mqtt", "uvicorn", "starlette"))
    print(f"machine: {machine['cpu']} ({machine['cores']} cores, {machine['int8_isa']}), {machine['platform']}")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        figures = run(args.server, devices, args.concurrency, args.retry_after, args.link, Path(tmp))
    print_table([figures])
    if not args.quick:
        print(write_result(f"rollout_{args.server}", figures))


if __name__ == "__main__":
    main()
