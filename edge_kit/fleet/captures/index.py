"""The `captures` table (migration 0004) with SQLAlchemy Core: exactly-once inserts keyed by record id,
duplicates found before a shard is written, counts per device and model version, the paged export in
stored order, label updates of a device's own records.

Inserts are `INSERT ... ON CONFLICT DO NOTHING` (the same construct on SQLite and PostgreSQL through
`Database.insert`), so two uploads of one record racing each other still store it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from edge_kit.fleet import tables as t
from edge_kit.fleet.storage import Storage

CHUNK = 500  # ids per IN (...) query: far below every driver's limit on bound parameters
c = t.captures.c


@dataclass(frozen=True)
class Cursor:
    """Where an export page stopped: the last record's (stored_at, id)."""

    stored_at: float
    id: str

    def encode(self) -> str:
        return f"{self.stored_at!r}~{self.id}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        at, sep, rid = text.partition("~")
        try:
            value = float(at)
        except ValueError:
            value = float("nan")
        if not sep or value != value or len(rid) != 32 or not all(ch in "0123456789abcdef" for ch in rid):
            raise ValueError("'after' is not a cursor this server gave out")
        return cls(value, rid)


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


class CaptureIndex:
    """Queries on `captures`, through the fleet `Database` (one connection behind a lock)."""

    def __init__(self, storage: Storage) -> None:
        self.database = storage.database
        self._insert = self.database.insert(t.captures).on_conflict_do_nothing().execution_options(
            preserve_rowcount=True)

    def existing(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` already stored."""
        found: set[str] = set()
        with self.database.read() as conn:
            for part in _chunks(list(ids)):
                found.update(str(r[0]) for r in conn.execute(sa.select(c.id).where(c.id.in_(part))))
        return found

    def insert(self, rows: Sequence[dict[str, Any]]) -> int:
        """Store index rows (one transaction); returns how many were new (the rest: already there)."""
        if not rows:
            return 0
        with self.database.write() as conn:
            result = conn.execute(self._insert, list(rows))
            return max(int(result.rowcount), 0) if len(rows) > 1 else int(result.rowcount == 1)

    def counts(self) -> list[dict[str, Any]]:
        """Held, labelled and bytes per device and model version."""
        query = (sa.select(c.device, c.model_sha256, c.model_version, sa.func.count().label("held"),
                           sa.func.count(c.label).label("labelled"), sa.func.sum(c.bytes).label("bytes"),
                           sa.func.max(c.stored_at).label("last_stored"))
                 .group_by(c.device, c.model_sha256, c.model_version).order_by(c.device, c.model_version))
        with self.database.read() as conn:
            return [{"device": r.device, "model_sha256": r.model_sha256, "model_version": r.model_version,
                     "held": int(r.held), "labelled": int(r.labelled), "bytes": int(r.bytes or 0),
                     "last_stored": float(r.last_stored)} for r in conn.execute(query)]

    def page(self, *, devices: Sequence[str] | None, since: float | None, labelled_only: bool,
             after: Cursor | None, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` index rows in stored order (stored_at, id), after the cursor."""
        query = sa.select(*t.captures.c)
        if devices:
            query = query.where(c.device.in_(list(devices)))
        if since is not None:
            query = query.where(c.created >= since)
        if labelled_only:
            query = query.where(c.label.is_not(None))
        if after is not None:
            query = query.where(sa.or_(c.stored_at > after.stored_at,
                                       sa.and_(c.stored_at == after.stored_at, c.id > after.id)))
        query = query.order_by(c.stored_at, c.id).limit(limit)
        with self.database.read() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def models_of(self, device: str, ids: Sequence[str]) -> dict[str, str]:
        """id -> model_sha256 of those of `ids` that are `device`'s records."""
        out: dict[str, str] = {}
        with self.database.read() as conn:
            for part in _chunks(list(ids)):
                rows = conn.execute(sa.select(c.id, c.model_sha256).where(c.device == device, c.id.in_(part)))
                out.update((str(r[0]), str(r[1])) for r in rows)
        return out

    def set_labels(self, device: str, labels: Sequence[tuple[str, str]], source: str = "device") -> int:
        """Set (id, label) on `device`'s own records; returns how many changed."""
        if not labels:
            return 0
        statement = (sa.update(t.captures).where(c.id == sa.bindparam("rid"), c.device == device)
                     .values(label=sa.bindparam("new_label"), label_source=source))
        with self.database.write() as conn:
            conn.execute(statement, [{"rid": rid, "new_label": label} for rid, label in labels])
        return len(labels)
