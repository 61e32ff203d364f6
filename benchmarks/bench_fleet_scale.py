"""Fleet-scale figures for docs/scale.md: SQLite beside PostgreSQL, drift evaluation at 100k+ devices.

1. Storage: the consumer's batched insert (`Storage.ingest`, 256 windows per transaction, the
   `ingest.batch_size` default) of already-validated digits windows, SQLite (WAL, synchronous=FULL)
   beside a real, throwaway PostgreSQL (initdb + pg_ctl, fsync and synchronous_commit on, as shipped);
   then validation + storage together (the consumer's work without MQTT) for both.
2. Drain through a real Mosquitto (benchmarks/bench_fleet_ingest.py's scenario): one and two fleet
   consumer processes writing to SQLite and to PostgreSQL, and the bare paho subscriber, in one run.
3. Drift evaluation, 30 channels x 32 bins, one window per device: `drift.evaluate_counts` in memory
   at several device counts (the slope extrapolates to 1,000,000), and `drift.evaluate_model` reading
   the same windows back from PostgreSQL and storing the results.

    python benchmarks/bench_fleet_scale.py [--quick] [--skip-ingest] [--skip-drift]
        [--memory-devices 50000,100000,250000] [--pg-devices 25000,100000]
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_drift import synthetic_windows, wide_reference  # noqa: E402
from benchmarks.bench_fleet_ingest import FLEET, scenario  # noqa: E402
from benchmarks.common import print_table, write_result  # noqa: E402
from edge_kit.fleet import drift  # noqa: E402
from edge_kit.fleet.settings import DriftSettings  # noqa: E402
from edge_kit.fleet.storage import Storage, WindowRow, encode_counts  # noqa: E402
from harness.processes import free_port  # noqa: E402

BATCH = 256  # IngestSettings.batch_size's default: one transaction (one fsync) per batch


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with the server's durable defaults (fsync on)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins:
            raise SystemExit("PostgreSQL is not installed: run `make system-deps`")
        self.bin = Path(bins[-1])
        self.version = self.bin.parent.name
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edgekit-pgbench-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the package's "postgres" user
            pw = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o755)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        data = str(self.root / "data")
        self._run("initdb", "-D", data, "-U", "edgekit", "--auth=trust", "-E", "UTF8")
        self._run("pg_ctl", "-D", data, "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")
        self.count = 0

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def fresh_database(self) -> str:
        """A new empty database (each measurement starts from an empty table)."""
        import psycopg

        self.count += 1
        name = f"bench{self.count}"
        with psycopg.connect(f"postgresql://edgekit@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://edgekit@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def digits_messages(total: int, tmp: Path) -> tuple[Any, list[tuple[str, bytes, str | None]]]:
    """`total` digits summaries from 1,000 devices, each with its own idempotency key, as the wire carries them."""
    from device_agent.uplink.wire import summary_topic
    from harness.fleetkit import make_bundle, sample_images, summary

    bundle = make_bundle(tmp / "bundle")
    base = summary(bundle, "d", 0.0, sample_images(200, np.random.default_rng(0))[0], fleet=FLEET)
    now = time.time()
    messages = []
    for i in range(total):
        base.device = f"dev{i % 1000:06d}"
        base.window_start = now - 80_000 + i
        base.window_end = base.window_start + 1
        messages.append((summary_topic(FLEET, base.device), *base.to_bytes()))
    return bundle, messages


def storage_rates(urls: dict[str, Callable[[], str]], total: int) -> list[dict[str, Any]]:
    """Windows/s of the batched insert alone, then of validation + insert, per database, one process.

    `urls` gives, per database kind, a function returning the URL of a new empty database.
    """
    from edge_kit.fleet.ingest import Ingestor, Validator
    from edge_kit.fleet.reference_index import ReferenceStore
    from edge_kit.fleet.settings import IngestSettings

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        bundle, messages = digits_messages(total, Path(tmp_name))
        settings = IngestSettings()
        validator = Validator(ReferenceStore([bundle.path]), settings)
        t0 = time.perf_counter()
        windows: list[WindowRow] = [validator.summary(topic, data, ctype) for topic, data, ctype in messages]
        validate_s = time.perf_counter() - t0
        rows.append({"what": "validation alone (decode + check against the reference)", "db": "-",
                     "windows": total, "seconds": validate_s, "windows_per_s": total / validate_s,
                     "per_cpu_s": None})
        for db, url in urls.items():
            storage = Storage(url())
            wall, cpu = time.perf_counter(), time.process_time()
            for lo in range(0, total, BATCH):
                storage.ingest(windows[lo : lo + BATCH], [], {"received": len(windows[lo : lo + BATCH])})
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert storage.window_count() == total, "every window stored once"
            storage.close()
            rows.append({"what": f"batched insert alone ({BATCH} windows per transaction)", "db": db,
                         "windows": total, "seconds": wall, "windows_per_s": total / wall,
                         "per_cpu_s": total / cpu})
        for db, url in urls.items():
            ingestor = Ingestor(Storage(url()), ReferenceStore([bundle.path]), settings)
            wall, cpu = time.perf_counter(), time.process_time()
            for m in messages:
                ingestor.receive(*m)
                if len(ingestor.batch) >= settings.batch_size:
                    ingestor.flush()
            ingestor.flush()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert ingestor.storage.window_count() == total, "every window stored once"
            ingestor.storage.close()
            rows.append({"what": "validation + batched insert (the consumer without MQTT)", "db": db,
                         "windows": total, "seconds": wall, "windows_per_s": total / wall,
                         "per_cpu_s": total / cpu})
    return rows


def drain_rates(pg: Postgres, total: int) -> list[dict[str, Any]]:
    """The bench_fleet_ingest drain (real Mosquitto, publishers in their own processes) per database."""
    rows = [scenario("paho subscriber, receive only", 0, 2, total)]
    for workers in (1, 2):
        for db in ("sqlite", "postgresql"):
            url = pg.fresh_database() if db == "postgresql" else None
            row = scenario(f"fleet consumer x{workers}, {db}", workers, 2, total, db=url)
            row["load_1min"] = os.getloadavg()[0]  # the shared machine's load as this row finished
            rows.append(row)
    return rows


def evaluation_memory(devices_list: list[int]) -> list[dict[str, Any]]:
    """`evaluate_counts` on one window per device (in memory), 30 channels x 32 bins."""
    ref = wide_reference(channels=30)
    settings = DriftSettings()
    rows = []
    for devices in devices_list:
        rng = np.random.default_rng(devices)
        flat = synthetic_windows(ref, devices, 500, drifted=devices // 200, rng=rng)
        names = np.array([f"dev{i:07d}" for i in range(devices)], dtype=object)
        starts = 1.8e9 + np.arange(devices) * 1e-3
        t0 = time.perf_counter()
        ev = drift.evaluate_counts(ref, names, starts, flat, settings)
        seconds = time.perf_counter() - t0
        rows.append({"devices": devices, "channels": len(ref.bins), "source": "memory", "seconds": seconds,
                     "us_per_device": seconds / devices * 1e6, "counts_MiB": flat.nbytes / 2**20,
                     "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                     "device_windows_flagged": sum(r[7] for r in ev.device_rows)})
        del flat, ev
    return rows


def evaluation_postgres(pg: Postgres, devices_list: list[int]) -> list[dict[str, Any]]:
    """`evaluate_model` from PostgreSQL: read the windows back, evaluate, store the results."""
    ref = wide_reference(channels=30)
    settings = DriftSettings()
    rows = []
    for devices in devices_list:
        rng = np.random.default_rng(devices)
        flat = synthetic_windows(ref, devices, 500, drifted=devices // 200, rng=rng)
        storage = Storage(pg.fresh_database())
        now = time.time()
        t0 = time.perf_counter()
        for lo in range(0, devices, 1000):
            storage.ingest([WindowRow(f"dev{i:07d}", ref.sha256, now - 200 + i * 1e-4, now - 100, 0, 500, "bench",
                                      "wide", "1", now, encode_counts(flat[i]), None)
                            for i in range(lo, min(lo + 1000, devices))], [], {})
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = drift.evaluate_model(storage, ref, settings, now)
        seconds = time.perf_counter() - t0
        # The same two queries evaluate_model runs, timed apart: how much of the pass is reading.
        t0 = time.perf_counter()
        storage.latest_windows(ref.sha256, now - settings.lookback_seconds, settings.m, settings.min_n)
        storage.windows(ref.sha256, now - settings.fleet_window_seconds * drift.FLEET_BUCKETS_READ * settings.m)
        read_s = time.perf_counter() - t0
        storage.close()
        rows.append({"devices": devices, "channels": len(ref.bins), "source": "postgresql, results stored",
                     "seconds": seconds, "us_per_device": seconds / devices * 1e6, "read_s": read_s,
                     "compute_s": ev.seconds,
                     "insert_windows_per_s": devices / load_s,
                     "device_windows_flagged": sum(r[7] for r in ev.device_rows)})
        del flat, ev
    return rows


def slope(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Least-squares seconds = a + b * devices over the measured rows, and its value at 1,000,000."""
    if len(rows) < 2:
        return None
    x = np.array([r["devices"] for r in rows], dtype=float)
    y = np.array([r["seconds"] for r in rows], dtype=float)
    b, a = np.polyfit(x, y, 1)
    return {"fixed_s": float(a), "us_per_device": float(b * 1e6), "extrapolated_1M_s": float(a + b * 1e6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument("--memory-devices", default=None, help="comma-separated device counts, in memory")
    parser.add_argument("--pg-devices", default=None, help="comma-separated device counts, from PostgreSQL")
    args = parser.parse_args()
    memory_devices = [int(v) for v in (args.memory_devices or
                                       ("20000,50000" if args.quick else "50000,100000,250000")).split(",")]
    pg_devices = [int(v) for v in (args.pg_devices or ("10000,20000" if args.quick else "25000,100000")).split(",")]
    figures: dict[str, Any] = {}
    load_before = os.getloadavg()
    pg = Postgres()
    try:
        figures["postgresql_version"] = pg.version
        if not args.skip_ingest:
            total = 3000 if args.quick else 10000
            with tempfile.TemporaryDirectory() as tmp:
                files = iter(range(100))
                storage = storage_rates({"sqlite": lambda: f"sqlite:///{tmp}/fleet{next(files)}.db",
                                         "postgresql": pg.fresh_database}, total)
            print_table(storage)
            figures["storage"] = storage
            drain = drain_rates(pg, total)
            print_table(drain)
            figures["drain"] = drain
        if not args.skip_drift:
            memory = evaluation_memory(memory_devices)
            print_table(memory)
            from_pg = evaluation_postgres(pg, pg_devices)
            print_table(from_pg)
            fits = {"memory": slope(memory), "postgresql": slope(from_pg)}
            print(fits)
            figures.update(evaluation_memory=memory, evaluation_postgresql=from_pg, evaluation_slope=fits)
    finally:
        pg.stop()
    figures["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print("load average before / after:", figures["load_average"])
    out = write_result("fleet_scale", figures, quick=args.quick,
                       conditions="broker, publishers, consumers and PostgreSQL on the same 2-core shared VM; "
                                  "other engineers' jobs running concurrently (see load_average)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
