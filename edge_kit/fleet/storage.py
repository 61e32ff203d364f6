"""One storage layer for the fleet service: SQLite (one file, WAL) by default, PostgreSQL by URL.

`sqlite:///PATH` opens a SQLite file in WAL mode (readers never block the writer, several consumer
processes can share it); `postgresql://...` uses psycopg (installed separately: `pip install
"psycopg[binary]"`). Both speak the same SQL here: `?` placeholders are translated for psycopg, and
upserts use `ON CONFLICT`, which both understand.

Windows are keyed by the idempotency key `(device, model_sha256, window_start)`: a QoS-1 duplicate
is an `ON CONFLICT DO NOTHING`, so it is dropped by the database itself, also across processes.
Every write is a transaction that commits before the MQTT message is acknowledged; SQLite runs
with `synchronous=FULL`, so an acknowledged window survives a crash of the process or the machine.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_kit.errors import UsageError
from edge_kit.fleet.dispersion_trailer import strip

# Stored counts use the narrowest unsigned type that holds them; the type follows from the blob's
# length (bins x itemsize), so no header is needed and int64 blobs stay readable.
_COUNT_TYPES: tuple[np.dtype[Any], ...] = (np.dtype("<u2"), np.dtype("<u4"), np.dtype("<i8"))


def encode_counts(flat: np.ndarray) -> bytes:
    top = int(flat.max()) if flat.size else 0
    dtype = _COUNT_TYPES[0] if top < 2**16 else _COUNT_TYPES[1] if top < 2**32 else _COUNT_TYPES[2]
    return np.ascontiguousarray(flat, dtype=dtype).tobytes()


def decode_counts(blobs: Sequence[bytes], bins: int) -> np.ndarray:
    """(len(blobs), bins) int64 from blobs written by `encode_counts` (mixed widths allowed)."""
    blobs = [strip(b, bins) for b in blobs]  # an optional trailer after the counts (dispersion.py)
    out = np.empty((len(blobs), bins), dtype=np.int64)
    by_size: dict[int, list[int]] = {}
    for i, b in enumerate(blobs):
        by_size.setdefault(len(b), []).append(i)
    for size, rows in by_size.items():
        itemsize = size // bins if bins else 8
        dtype: np.dtype[Any] | None = {2: _COUNT_TYPES[0], 4: _COUNT_TYPES[1], 8: _COUNT_TYPES[2]}.get(itemsize)
        if dtype is None or itemsize * bins != size:
            raise ValueError(f"stored counts of {size} bytes do not fit {bins} bins")
        out[rows] = np.frombuffer(b"".join(blobs[i] for i in rows), dtype=dtype).reshape(len(rows), bins)
    return out


Rows = Sequence[Sequence[Any]] | Callable[[list[int]], Sequence[Sequence[Any]]]


@dataclass(frozen=True)
class WindowRow:
    device: str
    model_sha256: str
    window_start: float
    window_end: float
    seq: int
    n: int
    fleet: str
    model_name: str
    model_version: str
    received_at: float
    counts: bytes  # the payload's counts concatenated in reference channel order (`encode_counts`)
    confusion: bytes | None  # int64 (classes x classes), or None without labels

    def as_params(self) -> tuple[Any, ...]:
        return (self.device, self.model_sha256, self.window_start, self.window_end, self.seq, self.n, self.fleet,
                self.model_name, self.model_version, self.received_at, self.counts, self.confusion)


class Storage:
    """A connection to the fleet database. Thread-safe (one connection behind a lock)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        if url.startswith("sqlite:///") or url == "sqlite://:memory:":
            path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ":memory:"
            if path != ":memory:":
                parent = Path(path).parent
                if not parent.is_dir():
                    raise UsageError(f"--db: folder {parent} does not exist")
            self.dialect = "sqlite"
            self._conn: Any = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._migrate(lambda: self._conn)  # the same connection: a :memory: database has no other
        elif url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg  # optional: only PostgreSQL deployments need it
            except ImportError as exc:
                raise UsageError("--db postgresql:// needs psycopg: pip install 'psycopg[binary]'") from exc
            self.dialect = "postgresql"
            try:
                self._conn = psycopg.connect(url, autocommit=True)
            except psycopg.Error as exc:
                raise UsageError(f"--db: cannot connect to PostgreSQL: {exc}") from exc
            # Its own transactional connection (the one above autocommits), closed when done.
            self._migrate(lambda: psycopg.connect(url))
        else:
            raise UsageError(f"--db must be sqlite:///PATH or postgresql://..., got {url!r}")

    # -- plumbing ----------------------------------------------------------------------------

    def _migrate(self, connect: Callable[[], Any]) -> None:
        """Upgrade the schema to this code's head revision (see `edge_kit.fleet.migrations`)."""
        import sqlalchemy as sa  # imported here: only a running fleet server needs them
        from sqlalchemy.pool import NullPool, StaticPool

        from edge_kit.fleet import migrations

        if self.dialect == "sqlite":
            engine = sa.create_engine("sqlite://", creator=connect, poolclass=StaticPool)

            @sa.event.listens_for(engine, "begin")
            def _write_lock(conn: sa.Connection) -> None:  # not pysqlite's deferred BEGIN: lock first
                conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            engine = sa.create_engine("postgresql+psycopg://", creator=connect, poolclass=NullPool)
        try:
            with self._lock:
                self.schema_revision = migrations.upgrade(engine)
        except migrations.SchemaTooNew as exc:
            raise UsageError(f"--db: {exc}") from exc
        finally:
            if self.dialect != "sqlite":
                engine.dispose()  # (a StaticPool's dispose would close the connection Storage keeps)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(self._sql(sql), params).fetchall())

    def _execute_many(self, statements: Iterable[tuple[str, Rows]]) -> list[int]:
        """Run statements in one transaction; returns the row count of each (for dedup accounting).

        A statement's rows may be a function of the row counts so far, so a counter update can
        depend on how many inserts were new, inside the same transaction.
        """
        counts: list[int] = []
        with self._lock:
            if self.dialect == "sqlite":
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in statements:
                        rows = rows(counts) if callable(rows) else rows
                        before = self._conn.total_changes
                        self._conn.executemany(sql, rows)
                        counts.append(self._conn.total_changes - before)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            else:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    for sql, rows in statements:
                        rows = rows(counts) if callable(rows) else rows
                        # One batch (pipelined by psycopg); its rowcount is the sum over the rows.
                        cur.executemany(self._sql(sql), rows)
                        counts.append(max(cur.rowcount, 0))
        return counts

    def _insert_returning_id(self, sql: str, row: Sequence[Any]) -> int:
        """One INSERT in its own transaction; its new id from RETURNING (not MAX(id), which another
        fleet server writing to the same database could have moved in between)."""
        sql = self._sql(sql + " RETURNING id")
        with self._lock:
            if self.dialect == "sqlite":
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    new_id = self._conn.execute(sql, row).fetchone()[0]
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            else:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    cur.execute(sql, row)
                    new_id = cur.fetchone()[0]
        return int(new_id)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, windows: Sequence[WindowRow], statuses: Sequence[dict[str, Any]],
               counters: dict[str, int]) -> int:
        """Store windows, device statuses and counter increments in one transaction.

        Returns how many windows were new; the rest were duplicates of stored ones. The counters
        `accepted` and `duplicate` are added in the same transaction, so they never disagree with
        what is stored.
        """
        latest: dict[str, WindowRow] = {}
        for w in windows:
            if w.device not in latest or w.window_end > latest[w.device].window_end:
                latest[w.device] = w
        seen = [(w.device, w.fleet, "online", w.received_at, w.model_sha256, w.model_name, w.model_version)
                for w in latest.values()]
        status_rows = [(s["device"], s["fleet"], s["state"], s["at"], s["at"], json.dumps(s["status"]))
                       for s in statuses]

        def counter_rows(done: list[int]) -> list[tuple[str, int]]:
            totals = dict(counters)
            if windows:
                totals["accepted"] = totals.get("accepted", 0) + done[0]
                totals["duplicate"] = totals.get("duplicate", 0) + len(windows) - done[0]
            return sorted((k, v) for k, v in totals.items() if v)

        statements: list[tuple[str, Rows]] = []
        if windows:
            statements.append(("INSERT INTO windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                               [w.as_params() for w in windows]))
        if seen:
            statements.append((
                "INSERT INTO devices (device, fleet, state, last_seen, model_sha256, model_name, model_version) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, "
                "model_sha256 = excluded.model_sha256, model_name = excluded.model_name, "
                "model_version = excluded.model_version, "
                "state = CASE WHEN devices.status_at IS NULL OR devices.status_at < excluded.last_seen "
                "THEN 'online' ELSE devices.state END", seen))
        if status_rows:
            statements.append((
                "INSERT INTO devices (device, fleet, state, last_seen, status_at, status) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (device) DO UPDATE SET state = excluded.state, status_at = excluded.status_at, "
                "status = excluded.status, last_seen = CASE WHEN devices.last_seen > excluded.last_seen "
                "THEN devices.last_seen ELSE excluded.last_seen END", status_rows))
        statements.append(("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
                           "value = counters.value + excluded.value", counter_rows))
        counts = self._execute_many([(self._sql(sql), rows) for sql, rows in statements])
        return counts[0] if windows else 0

    def add_counters(self, counters: dict[str, int]) -> None:
        self.ingest([], [], counters)

    def counters(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._query("SELECT name, value FROM counters")}

    def window_count(self, model_sha256: str | None = None) -> int:
        if model_sha256 is None:
            return int(self._query("SELECT COUNT(*) FROM windows")[0][0])
        return int(self._query("SELECT COUNT(*) FROM windows WHERE model_sha256 = ?", (model_sha256,))[0][0])

    def windows(self, model_sha256: str, since: float, device: str | None = None) -> list[tuple[Any, ...]]:
        """(device, window_start, window_end, n, counts, confusion) rows, oldest first."""
        sql = ("SELECT device, window_start, window_end, n, counts, confusion FROM windows "
               "WHERE model_sha256 = ? AND window_start >= ?")
        params: list[Any] = [model_sha256, since]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        return self._query(sql + " ORDER BY window_start, device", params)

    def latest_windows(self, model_sha256: str, since: float, per_device: int, min_n: int) -> list[tuple[Any, ...]]:
        """Each device's last `per_device` windows with at least `min_n` inferences, oldest first.

        What the per-device test needs, without reading a day of windows of every device.
        """
        sql = ("SELECT device, window_start, window_end, n, counts, confusion FROM ("
               " SELECT device, window_start, window_end, n, counts, confusion, ROW_NUMBER() OVER"
               " (PARTITION BY device ORDER BY window_start DESC) AS recent FROM windows"
               " WHERE model_sha256 = ? AND window_start >= ? AND n >= ?) AS ranked"
               " WHERE recent <= ? ORDER BY window_start, device")
        return self._query(sql, (model_sha256, since, min_n, per_device))

    def small_window_count(self, model_sha256: str, since: float, min_n: int) -> int:
        return int(self._query("SELECT COUNT(*) FROM windows WHERE model_sha256 = ? AND window_start >= ? AND n < ?",
                               (model_sha256, since, min_n))[0][0])

    def models_with_windows(self, since: float) -> list[str]:
        return [str(r[0]) for r in self._query(
            "SELECT DISTINCT model_sha256 FROM windows WHERE window_start >= ?", (since,))]

    def devices(self) -> list[dict[str, Any]]:
        cols = ("device", "fleet", "state", "last_seen", "status_at", "model_sha256", "model_name",
                "model_version", "status")
        rows = self._query(f"SELECT {', '.join(cols)} FROM devices ORDER BY device")
        out = []
        for r in rows:
            d = dict(zip(cols, r, strict=True))
            d["status"] = json.loads(d["status"]) if d["status"] else None
            out.append(d)
        return out

    # -- labels ------------------------------------------------------------------------------

    def add_labels(self, device: str, model_sha256: str, confusion: bytes, at: float | None = None) -> None:
        self._execute_many([(self._sql(
            "INSERT INTO labels (device, model_sha256, received_at, confusion) VALUES (?,?,?,?)"),
            [(device, model_sha256, time.time() if at is None else at, confusion)])])

    def labels(self, model_sha256: str, since: float) -> list[tuple[str, bytes]]:
        """(device, confusion) from POST /api/labels and from windows that carried labels."""
        posted = self._query("SELECT device, confusion FROM labels WHERE model_sha256 = ? AND received_at >= ?",
                             (model_sha256, since))
        carried = self._query("SELECT device, confusion FROM windows WHERE model_sha256 = ? AND window_start >= ? "
                              "AND confusion IS NOT NULL", (model_sha256, since))
        return [(str(d), bytes(c)) for d, c in posted + carried]

    # -- drift results -----------------------------------------------------------------------

    def save_evaluation(self, model_sha256: str, at: float, detail: dict[str, Any],
                        fleet_rows: Sequence[Sequence[Any]], device_rows: Sequence[Sequence[Any]]) -> None:
        statements: list[tuple[str, Rows]] = [
            ("INSERT INTO evaluations VALUES (?,?,?) ON CONFLICT (model_sha256) DO UPDATE SET "
             "evaluated_at = excluded.evaluated_at, detail = excluded.detail",
             [(model_sha256, at, json.dumps(detail))]),
            ("INSERT INTO drift_fleet VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (model_sha256, bucket_start, channel) "
             "DO UPDATE SET n = excluded.n, test = excluded.test, statistic = excluded.statistic, "
             "p_value = excluded.p_value, effect = excluded.effect, drifted = excluded.drifted, "
             "detail = excluded.detail", fleet_rows),
            ("INSERT INTO drift_device VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (model_sha256, device, window_start) "
             "DO UPDATE SET n = excluded.n, p_value = excluded.p_value, q_value = excluded.q_value, "
             "effect = excluded.effect, drifted = excluded.drifted, channels = excluded.channels", device_rows),
        ]
        self._execute_many([(self._sql(s), rows) for s, rows in statements if rows])

    def evaluation(self, model_sha256: str) -> dict[str, Any] | None:
        rows = self._query("SELECT evaluated_at, detail FROM evaluations WHERE model_sha256 = ?", (model_sha256,))
        return {"evaluated_at": rows[0][0], **json.loads(rows[0][1])} if rows else None

    def fleet_drift(self, model_sha256: str, channel: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        sql = ("SELECT bucket_start, channel, n, test, statistic, p_value, effect, drifted, detail FROM drift_fleet "
               "WHERE model_sha256 = ? AND bucket_start >= ?")
        params: list[Any] = [model_sha256, since]
        if channel is not None:
            sql += " AND channel = ?"
            params.append(channel)
        out = []
        for b, ch, n, test, stat, p, eff, drifted, detail in self._query(sql + " ORDER BY bucket_start", params):
            out.append({"window_start": b, "channel": ch, "n": n, "test": test, "statistic": stat, "p_value": p,
                        "effect": eff, "drifted": bool(drifted), **json.loads(detail)})
        return out

    def device_drift(self, model_sha256: str, device: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        sql = ("SELECT device, window_start, n, p_value, q_value, effect, drifted, channels FROM drift_device "
               "WHERE model_sha256 = ? AND window_start >= ?")
        params: list[Any] = [model_sha256, since]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        cols = ("device", "window_start", "n", "p_value", "q_value", "effect", "drifted", "channels")
        out = []
        for r in self._query(sql + " ORDER BY device, window_start", params):
            d = dict(zip(cols, r, strict=True))
            d["drifted"] = bool(d["drifted"])
            d["channels"] = json.loads(d["channels"])
            out.append(d)
        return out

    # -- alerts and triggers -----------------------------------------------------------------

    def open_alert(self, model_sha256: str, scope: str, kind: str) -> dict[str, Any] | None:
        """The alert already standing for this model/scope/kind, if any (so one condition raises one alert).

        Every state but `retrain_failed` stands: a dismissed or retrained condition of this model
        version does not come back; a failed retraining may be raised again.
        """
        rows = self._query("SELECT id FROM alerts WHERE model_sha256 = ? AND scope = ? AND kind = ? "
                           "AND state <> 'retrain_failed' ORDER BY id DESC",
                           (model_sha256, scope, kind))
        return self.alert(int(rows[0][0])) if rows else None

    def create_alert(self, model_sha256: str, scope: str, kind: str, state: str, summary: str,
                     detail: dict[str, Any]) -> int:
        return self._insert_returning_id(
            "INSERT INTO alerts (created_at, model_sha256, scope, kind, state, summary, detail) VALUES (?,?,?,?,?,?,?)",
            (time.time(), model_sha256, scope, kind, state, summary, json.dumps(detail)))

    def set_alert_state(self, alert_id: int, state: str, approved_by: str | None = None) -> None:
        if approved_by is not None:
            sql = "UPDATE alerts SET state = ?, approved_at = ?, approved_by = ? WHERE id = ?"
            params: tuple[Any, ...] = (state, time.time(), approved_by, alert_id)
        else:
            sql, params = "UPDATE alerts SET state = ? WHERE id = ?", (state, alert_id)
        self._execute_many([(self._sql(sql), [params])])

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        found = self.alerts(alert_id=alert_id)
        return found[0] if found else None

    def alerts(self, alert_id: int | None = None) -> list[dict[str, Any]]:
        cols = ("id", "created_at", "model_sha256", "scope", "kind", "state", "summary", "detail",
                "approved_at", "approved_by")
        alerts = self._select("alerts", cols, "id", alert_id, "id DESC", json_cols=("detail",))
        # All their triggers in one query, not one query per alert.
        by_alert: dict[int, list[dict[str, Any]]] = {int(a["id"]): [] for a in alerts}
        for t in self.triggers(alert_id):
            by_alert.setdefault(int(t["alert_id"]), []).append(t)
        for a in alerts:
            a["triggers"] = by_alert[int(a["id"])]
        return alerts

    def _select(self, table: str, cols: tuple[str, ...], where_col: str, where_value: Any, order: str,
                json_cols: tuple[str, ...]) -> list[dict[str, Any]]:
        """Rows of `table` as dicts (all, or those with `where_col` = `where_value`), JSON columns decoded."""
        sql = f"SELECT {', '.join(cols)} FROM {table}"
        params: tuple[Any, ...] = ()
        if where_value is not None:
            sql, params = sql + f" WHERE {where_col} = ?", (where_value,)
        out = []
        for r in self._query(sql + f" ORDER BY {order}", params):
            row = dict(zip(cols, r, strict=True))
            for c in json_cols:
                row[c] = json.loads(row[c])
            out.append(row)
        return out

    def add_trigger(self, alert_id: int, command: list[str], outcome: str, returncode: int | None = None,
                    output: str | None = None, finished: bool = False, at: float | None = None) -> int:
        now = time.time() if at is None else at
        return self._insert_returning_id(
            "INSERT INTO triggers (alert_id, at, command, outcome, returncode, finished_at, output) "
            "VALUES (?,?,?,?,?,?,?)",
            (alert_id, now, json.dumps(command), outcome, returncode, now if finished else None, output))

    def finish_trigger(self, trigger_id: int, outcome: str, returncode: int | None, output: str) -> None:
        self._execute_many([(self._sql(
            "UPDATE triggers SET outcome = ?, returncode = ?, finished_at = ?, output = ? WHERE id = ?"),
            [(outcome, returncode, time.time(), output, trigger_id)])])

    def triggers(self, alert_id: int | None = None) -> list[dict[str, Any]]:
        cols = ("id", "alert_id", "at", "command", "outcome", "returncode", "finished_at", "output")
        return self._select("triggers", cols, "alert_id", alert_id, "id", json_cols=("command",))

    def last_run_trigger_at(self) -> float | None:
        """When a retraining command was last started (rate-limited or refused ones do not count)."""
        rows = self._query("SELECT MAX(at) FROM triggers WHERE outcome IN ('running', 'succeeded', 'failed')")
        return None if rows[0][0] is None else float(rows[0][0])
