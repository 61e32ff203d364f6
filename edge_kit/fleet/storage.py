"""What the fleet service stores and reads: windows, devices, counters, labels, drift results, alerts.

The queries are SQLAlchemy Core constructs over `edge_kit.fleet.tables`, with bound parameters, so
one query serves SQLite and PostgreSQL; the connection, the dialects and the schema upgrade on start
are `edge_kit.fleet.database`.

Windows are keyed by the idempotency key `(device, model_sha256, window_start)`: a QoS-1 duplicate
is an `ON CONFLICT DO NOTHING`, so it is dropped by the database itself, also across processes.
Every write is a transaction that commits before the MQTT message is acknowledged; SQLite runs
with `synchronous=FULL`, so an acknowledged window survives a crash of the process or the machine.
A batch is one `executemany` per table (psycopg pipelines it into one round trip), whose row count
says how many windows were new.
"""

from __future__ import annotations

import json
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from edge_kit.fleet import tables as t
from edge_kit.fleet.database import Database
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

    def as_row(self) -> dict[str, Any]:
        """The `windows` row (field names are its column names)."""
        return dict(vars(self))


class Storage:
    """The fleet database's contents. Thread-safe (`Database` serialises the use of its connection)."""

    def __init__(self, url: str) -> None:
        self.database = Database(url)
        self.url = url
        self.dialect = self.database.dialect
        self.schema_revision = self.database.schema_revision
        insert = self.database.insert
        # Built once: SQLAlchemy caches each one's compiled SQL, ingest runs them per batch.
        # preserve_rowcount: the row count of an executemany, summed by the driver, is how many were new.
        self._insert_window = insert(t.windows).on_conflict_do_nothing().execution_options(preserve_rowcount=True)
        # SQLite: the same INSERT as plain SQL, each window a tuple in its placeholders' order. Through
        # the construct, SQLAlchemy builds a dict and calls a bind processor per column of every row,
        # which cost more than the insert itself on the consumer's hot path.
        self._window_sql: str | None = None
        if self.dialect == "sqlite":
            compiled = self._insert_window.compile(dialect=self.engine.dialect)
            self._window_sql = str(compiled)
            self._window_values = operator.attrgetter(*(compiled.positiontup or ()))
        seen = insert(t.devices)
        self._device_seen = seen.on_conflict_do_update(index_elements=[t.devices.c.device], set_={
            "last_seen": seen.excluded.last_seen, "model_sha256": seen.excluded.model_sha256,
            "model_name": seen.excluded.model_name, "model_version": seen.excluded.model_version,
            # A status newer than this window says more about the device than "it sent a window".
            "state": sa.case((sa.or_(t.devices.c.status_at.is_(None), t.devices.c.status_at < seen.excluded.last_seen),
                              "online"), else_=t.devices.c.state)})
        status = insert(t.devices)
        self._device_status = status.on_conflict_do_update(index_elements=[t.devices.c.device], set_={
            "state": status.excluded.state, "status_at": status.excluded.status_at, "status": status.excluded.status,
            "last_seen": sa.case((t.devices.c.last_seen > status.excluded.last_seen, t.devices.c.last_seen),
                                 else_=status.excluded.last_seen)})
        counter = insert(t.counters)
        self._add_counter = counter.on_conflict_do_update(
            index_elements=[t.counters.c.name], set_={"value": t.counters.c.value + counter.excluded.value})

    @property
    def engine(self) -> sa.Engine:
        return self.database.engine

    def close(self) -> None:
        self.database.close()

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
        seen = [{"device": w.device, "fleet": w.fleet, "state": "online", "last_seen": w.received_at,
                 "model_sha256": w.model_sha256, "model_name": w.model_name, "model_version": w.model_version}
                for w in latest.values()]
        status_rows = [{"device": s["device"], "fleet": s["fleet"], "state": s["state"], "last_seen": s["at"],
                        "status_at": s["at"], "status": json.dumps(s["status"])} for s in statuses]
        totals = dict(counters)
        new = 0
        with self.database.write() as conn:
            if windows:
                if self._window_sql is not None:
                    result = conn.exec_driver_sql(self._window_sql, [self._window_values(w) for w in windows],
                                                  execution_options={"preserve_rowcount": True})
                else:
                    result = conn.execute(self._insert_window, [w.as_row() for w in windows])
                new = max(result.rowcount, 0)
                totals["accepted"] = totals.get("accepted", 0) + new
                totals["duplicate"] = totals.get("duplicate", 0) + len(windows) - new
            if seen:
                conn.execute(self._device_seen, seen)
            if status_rows:
                conn.execute(self._device_status, status_rows)
            counter_rows = [{"name": k, "value": v} for k, v in sorted(totals.items()) if v]
            if counter_rows:
                conn.execute(self._add_counter, counter_rows)
        return new

    def add_counters(self, counters: dict[str, int]) -> None:
        self.ingest([], [], counters)

    def _rows(self, query: sa.Executable) -> list[tuple[Any, ...]]:
        with self.database.read() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def counters(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._rows(sa.select(t.counters.c.name, t.counters.c.value))}

    def window_count(self, model_sha256: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(t.windows)
        if model_sha256 is not None:
            query = query.where(t.windows.c.model_sha256 == model_sha256)
        return int(self._rows(query)[0][0])

    _WINDOW_COLS = ("device", "window_start", "window_end", "n", "counts", "confusion")

    def windows(self, model_sha256: str, since: float, device: str | None = None) -> list[tuple[Any, ...]]:
        """(device, window_start, window_end, n, counts, confusion) rows, oldest first."""
        w = t.windows.c
        query = sa.select(*(w[c] for c in self._WINDOW_COLS)).where(w.model_sha256 == model_sha256,
                                                                     w.window_start >= since)
        if device is not None:
            query = query.where(w.device == device)
        return self._rows(query.order_by(w.window_start, w.device))

    def latest_windows(self, model_sha256: str, since: float, per_device: int, min_n: int) -> list[tuple[Any, ...]]:
        """Each device's last `per_device` windows with at least `min_n` inferences, oldest first.

        What the per-device test needs, without reading a day of windows of every device.
        """
        w = t.windows.c
        recent = sa.func.row_number().over(partition_by=w.device, order_by=w.window_start.desc()).label("recent")
        ranked = (sa.select(*(w[c] for c in self._WINDOW_COLS), recent)
                  .where(w.model_sha256 == model_sha256, w.window_start >= since, w.n >= min_n).subquery("ranked"))
        r = ranked.c
        return self._rows(sa.select(*(r[c] for c in self._WINDOW_COLS)).where(r.recent <= per_device)
                          .order_by(r.window_start, r.device))

    def small_window_count(self, model_sha256: str, since: float, min_n: int) -> int:
        w = t.windows.c
        return int(self._rows(sa.select(sa.func.count()).select_from(t.windows).where(
            w.model_sha256 == model_sha256, w.window_start >= since, w.n < min_n))[0][0])

    def models_with_windows(self, since: float) -> list[str]:
        w = t.windows.c
        return [str(r[0]) for r in self._rows(sa.select(w.model_sha256).distinct().where(w.window_start >= since))]

    def devices(self) -> list[dict[str, Any]]:
        cols = ("device", "fleet", "state", "last_seen", "status_at", "model_sha256", "model_name",
                "model_version", "status")
        out = []
        for r in self._rows(sa.select(*(t.devices.c[c] for c in cols)).order_by(t.devices.c.device)):
            d = dict(zip(cols, r, strict=True))
            d["status"] = json.loads(d["status"]) if d["status"] else None
            out.append(d)
        return out

    # -- labels ------------------------------------------------------------------------------

    def add_labels(self, device: str, model_sha256: str, confusion: bytes, at: float | None = None) -> None:
        with self.database.write() as conn:
            conn.execute(sa.insert(t.labels).values(device=device, model_sha256=model_sha256,
                                                    received_at=time.time() if at is None else at,
                                                    confusion=confusion))

    def labels(self, model_sha256: str, since: float) -> list[tuple[str, bytes]]:
        """(device, confusion) from POST /api/labels and from windows that carried labels."""
        lab, w = t.labels.c, t.windows.c
        with self.database.read() as conn:
            posted = list(conn.execute(sa.select(lab.device, lab.confusion).where(
                lab.model_sha256 == model_sha256, lab.received_at >= since)))
            carried = list(conn.execute(sa.select(w.device, w.confusion).where(
                w.model_sha256 == model_sha256, w.window_start >= since, w.confusion.is_not(None))))
        return [(str(d), bytes(c)) for d, c in posted + carried]

    # -- drift results -----------------------------------------------------------------------

    def save_evaluation(self, model_sha256: str, at: float, detail: dict[str, Any],
                        fleet_rows: Sequence[Sequence[Any]], device_rows: Sequence[Sequence[Any]]) -> None:
        """Replace the model's evaluation; `fleet_rows`/`device_rows` in the column order of their tables."""
        insert = self.database.insert
        evaluation = insert(t.evaluations)
        fleet = insert(t.drift_fleet)
        device = insert(t.drift_device)
        statements: list[tuple[sa.Executable, list[dict[str, Any]]]] = [
            (evaluation.on_conflict_do_update(index_elements=list(t.evaluations.primary_key), set_={
                "evaluated_at": evaluation.excluded.evaluated_at, "detail": evaluation.excluded.detail}),
             [{"model_sha256": model_sha256, "evaluated_at": at, "detail": json.dumps(detail)}]),
            (fleet.on_conflict_do_update(index_elements=list(t.drift_fleet.primary_key), set_={
                c: fleet.excluded[c] for c in ("n", "test", "statistic", "p_value", "effect", "drifted", "detail")}),
             _as_dicts(t.drift_fleet, fleet_rows)),
            (device.on_conflict_do_update(index_elements=list(t.drift_device.primary_key), set_={
                c: device.excluded[c] for c in ("n", "p_value", "q_value", "effect", "drifted", "channels")}),
             _as_dicts(t.drift_device, device_rows)),
        ]
        with self.database.write() as conn:
            for statement, rows in statements:
                if rows:
                    conn.execute(statement, rows)

    def evaluation(self, model_sha256: str) -> dict[str, Any] | None:
        e = t.evaluations.c
        rows = self._rows(sa.select(e.evaluated_at, e.detail).where(e.model_sha256 == model_sha256))
        return {"evaluated_at": rows[0][0], **json.loads(rows[0][1])} if rows else None

    def fleet_drift(self, model_sha256: str, channel: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        f = t.drift_fleet.c
        query = (sa.select(f.bucket_start, f.channel, f.n, f.test, f.statistic, f.p_value, f.effect, f.drifted,
                           f.detail).where(f.model_sha256 == model_sha256, f.bucket_start >= since))
        if channel is not None:
            query = query.where(f.channel == channel)
        out = []
        for b, ch, n, test, stat, p, eff, drifted, detail in self._rows(query.order_by(f.bucket_start)):
            out.append({"window_start": b, "channel": ch, "n": n, "test": test, "statistic": stat, "p_value": p,
                        "effect": eff, "drifted": bool(drifted), **json.loads(detail)})
        return out

    def device_drift(self, model_sha256: str, device: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        d = t.drift_device.c
        cols = ("device", "window_start", "n", "p_value", "q_value", "effect", "drifted", "channels")
        query = sa.select(*(d[c] for c in cols)).where(d.model_sha256 == model_sha256, d.window_start >= since)
        if device is not None:
            query = query.where(d.device == device)
        out = []
        for r in self._rows(query.order_by(d.device, d.window_start)):
            row = dict(zip(cols, r, strict=True))
            row["drifted"] = bool(row["drifted"])
            row["channels"] = json.loads(row["channels"])
            out.append(row)
        return out

    # -- alerts and triggers -----------------------------------------------------------------

    def open_alert(self, model_sha256: str, scope: str, kind: str) -> dict[str, Any] | None:
        """The alert already standing for this model/scope/kind, if any (so one condition raises one alert).

        Every state but `retrain_failed` stands: a dismissed or retrained condition of this model
        version does not come back; a failed retraining may be raised again.
        """
        a = t.alerts.c
        rows = self._rows(sa.select(a.id).where(a.model_sha256 == model_sha256, a.scope == scope, a.kind == kind,
                                                a.state != "retrain_failed").order_by(a.id.desc()))
        return self.alert(int(rows[0][0])) if rows else None

    def create_alert(self, model_sha256: str, scope: str, kind: str, state: str, summary: str,
                     detail: dict[str, Any]) -> int:
        return self._insert_returning_id(t.alerts, created_at=time.time(), model_sha256=model_sha256, scope=scope,
                                         kind=kind, state=state, summary=summary, detail=json.dumps(detail))

    def _insert_returning_id(self, table: sa.Table, **row: Any) -> int:
        """One INSERT in its own transaction; its new id from RETURNING (not MAX(id), which another
        fleet server writing to the same database could have moved in between)."""
        with self.database.write() as conn:
            return int(conn.execute(sa.insert(table).values(**row).returning(table.c.id)).scalar_one())

    def set_alert_state(self, alert_id: int, state: str, approved_by: str | None = None) -> None:
        values: dict[str, Any] = {"state": state}
        if approved_by is not None:
            values.update(approved_at=time.time(), approved_by=approved_by)
        with self.database.write() as conn:
            conn.execute(sa.update(t.alerts).where(t.alerts.c.id == alert_id).values(**values))

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        found = self.alerts(alert_id=alert_id)
        return found[0] if found else None

    def alerts(self, alert_id: int | None = None) -> list[dict[str, Any]]:
        alerts = self._select(t.alerts, None if alert_id is None else t.alerts.c.id == alert_id,
                              t.alerts.c.id.desc(), json_cols=("detail",))
        # All their triggers in one query, not one query per alert.
        by_alert: dict[int, list[dict[str, Any]]] = {int(alert["id"]): [] for alert in alerts}
        for trigger in self.triggers(alert_id):
            by_alert.setdefault(int(trigger["alert_id"]), []).append(trigger)
        for alert in alerts:
            alert["triggers"] = by_alert[int(alert["id"])]
        return alerts

    def _select(self, table: sa.Table, where: sa.ColumnElement[bool] | None, order: sa.ColumnElement[Any],
                json_cols: tuple[str, ...]) -> list[dict[str, Any]]:
        """Rows of `table` as dicts (all, or those matching `where`), JSON columns decoded."""
        query = sa.select(table)
        if where is not None:
            query = query.where(where)
        out = []
        with self.database.read() as conn:
            for r in conn.execute(query.order_by(order)).mappings():
                row = dict(r)
                for c in json_cols:
                    row[c] = json.loads(row[c])
                out.append(row)
        return out

    def add_trigger(self, alert_id: int, command: list[str], outcome: str, returncode: int | None = None,
                    output: str | None = None, finished: bool = False, at: float | None = None) -> int:
        now = time.time() if at is None else at
        return self._insert_returning_id(t.triggers, alert_id=alert_id, at=now, command=json.dumps(command),
                                         outcome=outcome, returncode=returncode,
                                         finished_at=now if finished else None, output=output)

    def finish_trigger(self, trigger_id: int, outcome: str, returncode: int | None, output: str) -> None:
        with self.database.write() as conn:
            conn.execute(sa.update(t.triggers).where(t.triggers.c.id == trigger_id).values(
                outcome=outcome, returncode=returncode, finished_at=time.time(), output=output))

    def triggers(self, alert_id: int | None = None) -> list[dict[str, Any]]:
        tr = t.triggers.c
        return self._select(t.triggers, None if alert_id is None else tr.alert_id == alert_id, tr.id,
                            json_cols=("command",))

    def last_run_trigger_at(self) -> float | None:
        """When a retraining command was last started (rate-limited or refused ones do not count)."""
        tr = t.triggers.c
        rows = self._rows(sa.select(sa.func.max(tr.at)).where(tr.outcome.in_(("running", "succeeded", "failed"))))
        return None if rows[0][0] is None else float(rows[0][0])


def _as_dicts(table: sa.Table, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    names = [c.name for c in table.columns]
    return [dict(zip(names, r, strict=True)) for r in rows]
