"""The capture spool: captured records, label updates and capture state, on disk until the fleet took them.

SQLite in WAL mode with `synchronous=FULL`, like the window spool (`uplink/spool.py`): a `put` that
returned is on disk and survives kill -9 and power loss. A record leaves only when the fleet answered
200 for the batch holding it (or 400: resending a malformed batch cannot help), so a crash between
send and answer sends the same record ids again and the fleet stores them once.

Tables: `records` (the record's upload JSON with `label` null, its size, its label once known),
`uploaded` (id, request and row of uploaded records that came with a request id: a label arriving
after the upload becomes a label update), `label_updates` (id -> label, waiting for
`POST /api/captures/labels`), `requests` (fleet request ids already honoured) and `meta` (counters and
state: the day's budget, the rows still requested). Bounded: records by `max_bytes` (the oldest dropped
first, counted in `dropped_full`), the others by row counts. A corrupt file is moved aside and a new
one started; a locked one is waited for and then refused, never moved (the window spool's rules).

Counters that change without anything else to write (rows skipped for the budget) wait in memory and
go to disk with the next write, so a row that is not captured costs no disk write. The sampler's state
(the day's budget, the rows still requested) comes from `state_source`, read inside every write
transaction, so the newest state is what reaches the disk whichever thread writes last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.durable_sqlite import DurableFile, open_durable
from device_agent.errors import SpoolError

log = logging.getLogger(__name__)

DB_NAME = "captures.db"
MAX_UPLOADED_REMEMBERED = 100_000  # uploaded records remembered for late labels (~60 bytes each)
MAX_LABEL_UPDATES = 100_000  # label updates waiting; the oldest dropped first (counted)
MAX_REQUESTS_REMEMBERED = 1000  # fleet request ids already honoured
_LABEL_NULL = '"label":null}'  # how every spooled record's JSON ends (`label` is its last key)

# Persistent counters and state in `meta` (all integers).
COUNTERS = ("captured", "uploaded", "rejected", "dropped_full", "skipped_budget", "skipped_nonfinite",
            "labels_queued", "labels_sent", "labels_dropped", "requests_honoured")
STATE = ("budget_day", "budget_used", "requested_remaining")

CAPTURE_FILE = DurableFile("capture spool", "records", "capture.state_dir")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT,
    row INTEGER NOT NULL,
    created REAL NOT NULL,
    doc TEXT NOT NULL,
    size INTEGER NOT NULL,
    label TEXT
);
CREATE INDEX IF NOT EXISTS records_by_request ON records (request_id) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS uploaded (
    n INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL,
    row INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploaded_by_request ON uploaded (request_id);
CREATE TABLE IF NOT EXISTS label_updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, added INTEGER NOT NULL,
                                     at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class NewRecord:
    """A record to spool: `doc` is its upload JSON (compact, keys in contract order, ending `"label":null}`)."""

    id: str
    request_id: str | None
    row: int
    created: float  # the prediction's time: the same for every row of one `predict` call
    doc: str


@dataclass
class Batch:
    """Records read for one upload: their spool positions, the JSON sent, and the label each carried."""

    seqs: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    size: int = 0


@dataclass
class LabelBatch:
    seqs: list[int] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)  # (record id, label)


class _Tx:
    """Meta changes of one transaction, applied to the in-memory copy only once it committed."""

    def __init__(self) -> None:
        self.adds: dict[str, int] = {}
        self.sets: dict[str, int] = {}

    def add(self, name: str, delta: int) -> None:
        if delta:
            self.adds[name] = self.adds.get(name, 0) + delta


def with_label(doc: str, label: str | None) -> str:
    """The record's upload JSON with its label filled in."""
    if label is None:
        return doc
    return doc[: -len(_LABEL_NULL)] + '"label":' + json.dumps(label) + "}"


class CaptureStore:
    """Thread-safe; every write is one transaction."""

    def __init__(self, path: str | Path, *, max_bytes: int, lock_timeout: float = 10.0) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.lock_timeout = lock_timeout
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._deferred_adds: dict[str, int] = {}
        self._deferred_sets: dict[str, int] = {}
        # The current values of STATE (the sampler's), read in every write transaction; None: `sets` only.
        self.state_source: Callable[[], Mapping[str, int]] | None = None
        self._db, self.recovered_from = open_durable(self.path, _SCHEMA, CAPTURE_FILE, lock_timeout=lock_timeout)
        db = self._db
        self._meta = {str(name): int(value) for name, value in db.execute("SELECT name, value FROM meta")}
        count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records").fetchone()
        self._records, self._bytes = int(count), int(total)
        self._labels = int(db.execute("SELECT COUNT(*) FROM label_updates").fetchone()[0])

    # -- transactions -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[tuple[sqlite3.Connection, _Tx]]:
        """One IMMEDIATE transaction under the lock; the deferred counters ride along. SpoolError on failure."""
        with self._lock:
            if self._closed:
                raise SpoolError(f"capture spool {self.path} is closed")
            tx = _Tx()
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db, tx
                for name, delta in self._deferred_adds.items():
                    tx.add(name, delta)
                sets = {**(self.state_source() if self.state_source is not None else {}), **self._deferred_sets,
                        **tx.sets}
                for name, delta in tx.adds.items():
                    db.execute("INSERT INTO meta (name, value) VALUES (?, ?) "
                               "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, delta))
                for name, value in sets.items():
                    db.execute("INSERT INTO meta (name, value) VALUES (?, ?) "
                               "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise SpoolError(f"cannot {what} in capture spool {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            self._deferred_adds.clear()
            self._deferred_sets.clear()
            for name, delta in tx.adds.items():
                self._meta[name] = self._meta.get(name, 0) + delta
            self._meta.update(sets)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def defer(self, *, adds: Mapping[str, int] | None = None, sets: Mapping[str, int] | None = None) -> None:
        """Counter and state changes that need no write of their own: kept in memory (and shown by
        `counters`) until the next write or `close` puts them on disk."""
        with self._lock:
            for name, delta in (adds or {}).items():
                if delta:
                    self._deferred_adds[name] = self._deferred_adds.get(name, 0) + delta
            self._deferred_sets.update(sets or {})

    # -- records ------------------------------------------------------------------------------------

    def put(self, records: Sequence[NewRecord], *, adds: Mapping[str, int] | None = None,
            sets: Mapping[str, int] | None = None) -> int:
        """Spool `records` (and the counter/state changes that go with them) in one durable transaction;
        drops the oldest records while over `max_bytes`. Returns how many were dropped."""
        sizes = [len(r.doc) for r in records]
        with self._transaction("store records") as (db, tx):
            db.executemany("INSERT OR IGNORE INTO records (id, request_id, row, created, doc, size) "
                           "VALUES (?,?,?,?,?,?)",
                           [(r.id, r.request_id, r.row, r.created, r.doc, size)
                            for r, size in zip(records, sizes, strict=True)])
            for name, delta in (adds or {}).items():
                tx.add(name, delta)
            tx.sets.update(sets or {})
            total = self._bytes + sum(sizes)
            dropped, freed, last = 0, 0, -1
            if total > self.max_bytes:
                for seq, size in db.execute("SELECT seq, size FROM records ORDER BY seq"):
                    if total - freed <= self.max_bytes:
                        break
                    dropped += 1
                    freed += int(size)
                    last = int(seq)
                db.execute("DELETE FROM records WHERE seq <= ?", (last,))
                tx.add("dropped_full", dropped)
        self._records += len(records) - dropped
        self._bytes = total - freed
        if dropped:
            log.warning("capture spool full (%d bytes): dropped the %d oldest records", self.max_bytes, dropped)
        return dropped

    def next_batch(self, max_records: int, max_bytes: int) -> Batch:
        """The oldest records, at most `max_records` and `max_bytes` of JSON (but at least one)."""
        batch = Batch()
        with self._lock:
            if self._closed:
                return batch
            rows = self._db.execute("SELECT seq, id, doc, label FROM records ORDER BY seq LIMIT ?",
                                    (max_records,)).fetchall()
        for seq, record_id, doc, label in rows:
            text = with_label(doc, label)
            if batch.seqs and batch.size + len(text) + 1 > max_bytes:
                break
            batch.seqs.append(int(seq))
            batch.ids.append(record_id)
            batch.docs.append(text)
            batch.labels.append(label)
            batch.size += len(text) + 1
        return batch

    def ack(self, batch: Batch, *, rejected: AbstractSet[str] = frozenset()) -> None:
        """The fleet answered 200 for `batch`: every record in it leaves the spool. Those it holds are
        remembered (when they came with a request id) for late labels; a label that arrived while the
        batch was on its way becomes a label update."""
        self._remove(batch, rejected=rejected)

    def drop(self, batch: Batch) -> None:
        """The fleet refused `batch` as malformed (400): resending cannot help; counted as rejected."""
        self._remove(batch, rejected=set(batch.ids))

    def _remove(self, batch: Batch, *, rejected: AbstractSet[str]) -> None:
        if not batch.seqs:
            return
        sent = dict(zip(batch.seqs, batch.labels, strict=True))
        with self._transaction("remove uploaded records") as (db, tx):
            marks = ",".join("?" * len(batch.seqs))
            rows = db.execute(f"SELECT seq, id, request_id, row, created, label, size FROM records "
                              f"WHERE seq IN ({marks})", batch.seqs).fetchall()
            freed, held, late = 0, 0, []
            for seq, record_id, request_id, row, created, label, size in rows:
                freed += int(size)
                if record_id in rejected:
                    continue
                held += 1
                if request_id is not None:
                    db.execute("INSERT OR IGNORE INTO uploaded (id, request_id, row, created) VALUES (?,?,?,?)",
                               (record_id, request_id, row, created))
                if label is not None and label != sent[seq]:
                    late.append((record_id, label))
            db.execute(f"DELETE FROM records WHERE seq IN ({marks})", batch.seqs)
            db.execute("DELETE FROM uploaded WHERE n <= (SELECT MAX(n) FROM uploaded) - ?", (MAX_UPLOADED_REMEMBERED,))
            queued = self._queue_labels(db, tx, late)
            tx.add("uploaded", held)
            tx.add("rejected", len(rows) - held)
        self._records -= len(rows)
        self._bytes -= freed
        self._labels += queued

    # -- labels -------------------------------------------------------------------------------------

    def label(self, request_id: str, labels: Sequence[str], created: float | None = None) -> tuple[int, int]:
        """Label the captured rows of `request_id` (`labels[row]`), only those of the call made at `created`
        when given (a reused request id names its newest call, as for the agent's labels): rows still
        spooled get it in their record, rows already uploaded become label updates. Returns (labelled in
        the spool, queued)."""
        when = "" if created is None else " AND created = ?"
        args: tuple[object, ...] = (request_id,) if created is None else (request_id, created)
        with self._transaction("label records") as (db, tx):
            spooled = db.execute(f"SELECT seq, row FROM records WHERE request_id = ?{when}", args).fetchall()
            changes = [(labels[row], seq) for seq, row in spooled if 0 <= row < len(labels)]
            db.executemany("UPDATE records SET label = ? WHERE seq = ?", changes)
            uploaded = db.execute(f"SELECT id, row FROM uploaded WHERE request_id = ?{when}", args).fetchall()
            updates = [(rid, labels[row]) for rid, row in uploaded if 0 <= row < len(labels)]
            added = self._queue_labels(db, tx, updates)
        self._labels += added
        return len(changes), len(updates)

    def _queue_labels(self, db: sqlite3.Connection, tx: _Tx, labels: list[tuple[str, str]]) -> int:
        """Upsert label updates (a newer label for the same record replaces the waiting one), bounded; returns
        how many more wait now."""
        if not labels:
            return 0
        before = int(db.execute("SELECT COUNT(*) FROM label_updates").fetchone()[0])
        db.executemany("INSERT INTO label_updates (id, label) VALUES (?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET label = excluded.label", labels)
        after = int(db.execute("SELECT COUNT(*) FROM label_updates").fetchone()[0])
        excess = after - MAX_LABEL_UPDATES
        if excess > 0:
            db.execute("DELETE FROM label_updates WHERE seq IN (SELECT seq FROM label_updates ORDER BY seq LIMIT ?)",
                       (excess,))
            tx.add("labels_dropped", excess)
            after -= excess
        tx.add("labels_queued", len(labels))
        return after - before

    def next_labels(self, limit: int) -> LabelBatch:
        batch = LabelBatch()
        with self._lock:
            if self._closed:
                return batch
            rows = self._db.execute("SELECT seq, id, label FROM label_updates ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()
        for seq, record_id, label in rows:
            batch.seqs.append(int(seq))
            batch.labels.append((record_id, label))
        return batch

    def ack_labels(self, batch: LabelBatch, *, dropped: bool = False) -> None:
        """The fleet answered for these label updates: forget them, unless a newer label replaced one since."""
        if not batch.seqs:
            return
        with self._transaction("remove sent labels") as (db, tx):
            before = int(db.execute("SELECT COUNT(*) FROM label_updates").fetchone()[0])
            db.executemany("DELETE FROM label_updates WHERE seq = ? AND label = ?",
                           [(seq, label) for seq, (_, label) in zip(batch.seqs, batch.labels, strict=True)])
            gone = before - int(db.execute("SELECT COUNT(*) FROM label_updates").fetchone()[0])
            tx.add("labels_dropped" if dropped else "labels_sent", gone)
        self._labels -= gone

    # -- fleet requests -----------------------------------------------------------------------------

    def honoured(self, request_id: str) -> bool:
        with self._lock:
            if self._closed:
                return True
            return self._db.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is not None

    def honour(self, request_id: str, added: int, remaining: int, at: float) -> bool:
        """Remember `request_id` as honoured and set the rows still requested, in one transaction; False
        when it was honoured before (nothing changes)."""
        with self._transaction("record a fleet request") as (db, tx):
            cur = db.execute("INSERT OR IGNORE INTO requests (id, added, at) VALUES (?,?,?)", (request_id, added, at))
            new = cur.rowcount == 1
            if new:
                db.execute("DELETE FROM requests WHERE n <= (SELECT MAX(n) FROM requests) - ?",
                           (MAX_REQUESTS_REMEMBERED,))
                tx.add("requests_honoured", 1)
                tx.sets["requested_remaining"] = remaining
        return new

    # -- reading ------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Persistent counters and state, with the changes not yet on disk (no query)."""
        current = self.state_source() if self.state_source is not None else {}
        with self._lock:
            out = {name: self._meta.get(name, 0) + self._deferred_adds.get(name, 0) for name in COUNTERS}
            for name in STATE:
                out[name] = current.get(name, self._deferred_sets.get(name, self._meta.get(name, 0)))
            return out

    def _unsaved(self) -> bool:
        if self._deferred_adds or self._deferred_sets:
            return True
        current = self.state_source() if self.state_source is not None else {}
        return any(self._meta.get(name, 0) != value for name, value in current.items())

    def pending(self) -> dict[str, int]:
        """Records and their bytes waiting for upload, label updates waiting (no query)."""
        with self._lock:
            return {"records": self._records, "bytes": self._bytes, "labels": self._labels}

    def close(self) -> None:
        """Write the deferred counters and close; later calls fail softly (SpoolError, empty batches)."""
        if not self._closed and self._unsaved():
            with contextlib.suppress(SpoolError), self._transaction("save counters"):
                pass
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
