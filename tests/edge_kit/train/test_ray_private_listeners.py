"""The private Ray instance edge-kit starts (no --ray-address) listens on loopback only.

It is started the way `engine = "ray"` training and `batch-predict` start it (`ray_cluster.connect`), in
a fresh interpreter; every TCP socket in LISTEN state held by that interpreter or any process below it
(GCS, raylet, object manager, workers, dashboard and runtime-env agents) is read from /proc.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.processes import cli_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

_START_AND_LIST = r"""
import ipaddress, json, os, socket, struct, sys, time
from edge_kit.train.ray_cluster import connect
import ray

connect(None, 2)
ray.get(ray.remote(lambda: 1).remote())  # a worker runs, so worker listeners exist too
time.sleep(2)

def descendants(root):
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                frontier.append(child)
    return found

def owners(pids):
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    comm = open(f"/proc/{pid}/comm").read().strip()
                    inodes[target[8:-1]] = comm
        except OSError:
            continue
    return inodes

def address(hex_addr, v6):
    raw = bytes.fromhex(hex_addr)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))

inodes = owners(descendants(os.getpid()))
listeners = []
for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            host, port = fields[1].split(":")
            listeners.append({"process": inodes[fields[9]], "host": address(host, v6), "port": int(port, 16)})
ray.shutdown()
print(json.dumps(listeners))
"""


def _loopback(host: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def test_every_listener_of_the_private_instance_is_on_loopback() -> None:
    pytest.importorskip("ray", reason="the `ray` extra is not installed")
    env = cli_env({"RAY_ADDRESS": ""})
    env.pop("RAY_ADDRESS")
    done = subprocess.run([sys.executable, "-c", _START_AND_LIST], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listeners = json.loads(done.stdout.strip().splitlines()[-1])
    processes = {item["process"] for item in listeners}
    # Not vacuous: the GCS, the raylet and the runtime-env agent each listen (7 sockets with Ray 2.60).
    assert len(listeners) >= 5 and {"gcs_server", "raylet"} <= processes, listeners
    exposed = [item for item in listeners if not _loopback(item["host"])]
    assert not exposed, f"listening beyond loopback: {exposed}"
