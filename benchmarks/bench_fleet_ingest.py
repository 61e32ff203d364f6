"""Ingest rate of the fleet consumer through a real Mosquitto, publishers in separate processes.

Scenarios, each on a fresh database and broker (see `scenario` for the method):
- `paho subscriber, receive only`: a bare paho subscriber (QoS 1, auto-ack, no processing): the ceiling here;
- `fleet consumer x1`, `x2`: `run_consumer` processes on the shared subscription, each validating
  every summary against the bundle's reference and storing it (SQLite WAL, synchronous=FULL,
  acknowledged after commit);
- `validation + storage only`: the same work without MQTT, to separate our cost from paho's.
`per_consumer_cpu_s` is summaries stored per CPU-second of a consumer process: what one process does
with a core to itself, the figure that survives the load other jobs put on this shared 2-core VM.
Summaries are the digits model's (30 channels, 32 bins), zlib-compressed, each with its own
idempotency key, published by 2 separate publisher processes.

The bare subscriber and consumer x1 alternate over `--rounds` rounds (same load for both); the
printed ratio is the median of the per-round ratios of their drain rates.

    python benchmarks/bench_fleet_ingest.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_result  # noqa: E402
from device_agent.host import host_info  # noqa: E402

FLEET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def publisher(port: int, bundle_dir: str, index: int, count: int, go: Any, done: Any) -> None:
    import numpy as np
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from device_agent.uplink.wire import summary_topic
    from harness.fleetkit import make_bundle, sample_images, summary

    bundle = make_bundle(Path(bundle_dir))
    rng = np.random.default_rng(index)
    base = [summary(bundle, f"p{index}-dev{d}", 0.0, sample_images(200, rng)[0], fleet=FLEET) for d in range(20)]
    now = time.time()
    messages = []
    for i in range(count):
        s = base[i % 20]
        s.device = f"p{index}-dev{i % 20}"
        s.window_start = now - 80_000 + i  # a distinct idempotency key per message
        s.window_end = s.window_start + 1
        data, ctype = s.to_bytes()
        messages.append((summary_topic(FLEET, s.device), data, ctype))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub{index}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    go.wait()
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = messages[0][2]
    info = None
    for topic, data, _ in messages:
        info = c.publish(topic, data, qos=1, properties=props)
    if info is not None:
        info.wait_for_publish(600)
    done.put(time.time())
    c.loop_stop()
    c.disconnect()


def bare_subscriber(port: int, expected: int, stop: Any, ready: Any, result: Any) -> None:
    """A paho subscriber that only counts (QoS 1, automatic acks), on a persistent session."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from device_agent.uplink.wire import shared_topic, summary_topic

    got = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        got["n"] += 1
        got["last"] = time.time()
        if got["n"] == 1:
            got["first"] = got["last"]

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.subscribe(shared_topic("bench", summary_topic(FLEET)), qos=1)
    deadline = time.time() + 600
    while got["n"] < expected and time.time() < deadline and not stop.is_set():
        c.loop(timeout=0.05)
    result.put((got["n"], got["first"], got["last"]))
    c.disconnect()


def consumer(port: int, db: str, bundle_path: str, worker: int, stop: Any, ready: Any, cpu: Any) -> None:
    from edge_kit.fleet.ingest import ConsumerConfig, run_consumer
    from edge_kit.fleet.settings import FleetSettings

    cfg = ConsumerConfig(broker=f"mqtt://127.0.0.1:{port}", db=db, fleet=FLEET, group="bench", worker=worker,
                         bundles=(bundle_path,), bundles_dir=None, settings=FleetSettings(),
                         subscribe_status=(worker == 0))
    start = time.process_time()
    totals = run_consumer(cfg, stop, ready)
    # CPU seconds this consumer spent, and what it stored: its rate had it a core to itself.
    cpu.put((time.process_time() - start, totals.get("accepted", 0)))


def scenario(name: str, workers: int, publishers: int, total: int, db: str | None = None) -> dict[str, Any]:
    """Subscribe (creating the persistent sessions), go offline, let the publishers fill the broker's
    queue, then start the subscribers again and time the drain from the first to the last message
    stored. The publishers (separate processes) have finished by then, so on this 2-core machine
    they do not compete with the consumers for CPU; `live` below measures them running together."""
    from edge_kit.fleet.storage import Storage
    from harness.fleetkit import make_bundle

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker, port = start_broker(tmp)
        bundle = make_bundle(tmp / "bundles")
        db = db or f"sqlite:///{tmp}/fleet.db"  # `db`: an empty database elsewhere (bench_fleet_scale's PostgreSQL)
        Storage(db).close()
        result: Any = ctx.Queue()
        cpu: Any = ctx.Queue()

        def start(stop: Any) -> list[Any]:
            procs, readies = [], []
            for w in range(max(workers, 1)):
                ready = ctx.Event()
                readies.append(ready)
                if workers == 0:
                    args: tuple[Any, ...] = (port, total, stop, ready, result)
                    procs.append(ctx.Process(target=bare_subscriber, args=args))
                else:
                    args = (port, db, str(bundle.path), w, stop, ready, cpu)
                    procs.append(ctx.Process(target=consumer, args=args))
            for p in procs:
                p.start()
            for r in readies:
                if not r.wait(60):
                    raise RuntimeError("subscriber did not become ready")
            return procs

        def stop_all(procs: list[Any], stop: Any) -> None:
            stop.set()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.terminate()

        try:
            first_stop = ctx.Event()
            stop_all(start(first_stop), first_stop)
            if workers == 0:
                result.get(timeout=10)  # the first session's (empty) count
            else:
                for _ in range(workers):
                    cpu.get(timeout=10)
            go = ctx.Event()
            done: Any = ctx.Queue()
            pubs = [ctx.Process(target=publisher, args=(port, str(tmp / f"pb{i}"), i, total // publishers, go, done))
                    for i in range(publishers)]
            for p in pubs:
                p.start()
            go.set()
            for _ in pubs:
                done.get(timeout=600)
            for p in pubs:
                p.join(60)
            stop = ctx.Event()
            procs = start(stop)
            if workers == 0:
                received, first, last = result.get(timeout=600)
            else:
                storage = Storage(db)
                received, first, last = 0, 0.0, 0.0
                deadline = time.time() + 600
                while received < total and time.time() < deadline:
                    time.sleep(0.02)
                    count = storage.window_count()
                    if count != received:
                        if received == 0:
                            first = time.time()
                        received, last = count, time.time()
                storage.close()
            stop_all(procs, stop)
            seconds = last - first
            row = {"scenario": name, "consumer_processes": max(workers, 1), "publisher_processes": publishers,
                   "messages": received, "seconds": seconds, "summaries_per_s": received / seconds,
                   "per_consumer_process_per_s": received / seconds / max(workers, 1), "per_consumer_cpu_s": None}
            if workers:
                used = [cpu.get(timeout=30) for _ in range(workers)]
                row["per_consumer_cpu_s"] = sum(n for _, n in used) / sum(c for c, _ in used)
            return row
        finally:
            broker.terminate()
            broker.wait(10)


def processing_only(total: int) -> dict[str, Any]:
    """CPU cost of validation + storage alone (no MQTT): decode, check against the reference, commit."""
    import numpy as np

    from device_agent.uplink.wire import summary_topic
    from edge_kit.fleet.ingest import Ingestor
    from edge_kit.fleet.reference_index import ReferenceStore
    from edge_kit.fleet.settings import IngestSettings
    from edge_kit.fleet.storage import Storage
    from harness.fleetkit import make_bundle, sample_images, summary

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = make_bundle(tmp)
        base = summary(bundle, "d", 0.0, sample_images(200, np.random.default_rng(0))[0], fleet=FLEET)
        now = time.time()
        messages = []
        for i in range(total):
            base.device = f"dev{i % 50}"
            base.window_start = now - 80_000 + i
            base.window_end = base.window_start + 1
            messages.append((summary_topic(FLEET, base.device), *base.to_bytes()))
        settings = IngestSettings()
        ingestor = Ingestor(Storage(f"sqlite:///{tmp}/fleet.db"), ReferenceStore([bundle.path]), settings)
        wall, cpu = time.perf_counter(), time.process_time()
        for m in messages:
            ingestor.receive(*m)
            if len(ingestor.batch) >= settings.batch_size:
                ingestor.flush()
        ingestor.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert ingestor.storage.window_count() == total
        ingestor.storage.close()
    return {"scenario": "validation + storage only (no MQTT), one process", "messages": total,
            "summaries_per_s": total / wall, "summaries_per_cpu_s": total / cpu,
            "payload_bytes": len(messages[0][1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4,000 summaries a scenario, 3 rounds")
    parser.add_argument("--rounds", type=int, help="alternating rounds of the bare subscriber and consumer x1")
    args = parser.parse_args()
    total = 4000 if args.quick else 20000
    rounds = args.rounds or 3
    load_before = os.getloadavg()
    # Side by side: the bare subscriber and one consumer alternate, so both see the same load; the
    # ratio is taken per round, and its median reported.
    rows, ratios = [], []
    for _ in range(rounds):
        bare = scenario("paho subscriber, receive only", 0, 2, total)
        one = scenario("fleet consumer x1", 1, 2, total)
        rows += [bare, one]
        ratios.append(one["summaries_per_s"] / bare["summaries_per_s"])
    rows.append(scenario("fleet consumer x2 (shared subscription)", 2, 2, total))
    print_table(rows)
    alone = processing_only(total)
    print_table([alone])
    ratio = statistics.median(ratios)
    print(f"fleet consumer x1 / bare paho subscriber: {ratio:.2f} (median of {rounds} alternating rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    info = host_info()
    load_after = os.getloadavg()
    print(f"machine: {info.get('cpu')}, {info.get('cores')} cores; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}")
    out = write_result("fleet_ingest", {"drain": rows, "processing_only": alone, "ratio_x1_vs_bare": ratio,
                                        "ratio_per_round": ratios, "load_average_before": load_before,
                                        "load_average_after": load_after},
                       quick=args.quick, rounds=rounds,
                       conditions="broker, publishers and consumers on the same 2-core shared VM; "
                                  "other engineers' jobs running concurrently")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
