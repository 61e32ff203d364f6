"""Store-and-forward spool: closed windows wait on disk until the broker acknowledged them.

SQLite in WAL mode with `synchronous=FULL`: a `put` that returned is on disk and survives kill -9
and power loss; a delete happens only after the broker's PUBACK. Each row carries its idempotency
key (device, model sha256, window start), so re-spooling the same window is a no-op. The spool is
bounded: when full, the oldest windows are dropped first and the number dropped is kept (and
reported in the status message), because on a device the newest data is worth more than a full
disk. A spool file that is corrupt (SQLite says NOTADB or CORRUPT, or `quick_check` fails) is moved
aside (never deleted) and a new one started, so one corrupt file cannot keep the agent down. A spool
that is merely busy (another process holds its lock) or cannot be opened is NOT corrupt: the agent
waits up to `lock_timeout` and then stops with a clear error, and the windows in it stay where they are.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from device_agent.durable_sqlite import DurableFile, SpoolUnavailableError, open_durable
from device_agent.errors import SpoolError

log = logging.getLogger(__name__)

DEFAULT_MAX_WINDOWS = 10_000
SPOOL_FILE = DurableFile("spool", "windows", "--spool")

__all__ = ["DEFAULT_MAX_WINDOWS", "Spool", "SpoolUnavailableError", "SpooledWindow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    content_type TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpooledWindow:
    id: int
    key: str
    topic: str
    payload: bytes
    content_type: str


class Spool:
    """A bounded, durable FIFO of encoded summary messages. Safe to use from several threads."""

    def __init__(self, path: str | Path, *, max_windows: int = DEFAULT_MAX_WINDOWS,
                 lock_timeout: float = 10.0) -> None:
        if max_windows < 1:
            raise ValueError("max_windows must be at least 1")
        self.path = Path(path)
        self.max_windows = max_windows
        self.lock_timeout = lock_timeout
        self.recovered_from: Path | None = None
        self._lock = threading.Lock()
        self._db, self.recovered_from = open_durable(self.path, _SCHEMA, SPOOL_FILE, lock_timeout=lock_timeout)

    def put(self, key: str, topic: str, payload: bytes, content_type: str) -> bool:
        """Store a window durably; False if this key is already spooled. Raises SpoolError on I/O failure."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO windows (key, topic, payload, content_type, created_at) VALUES (?,?,?,?,?)",
                    (key, topic, payload, content_type, time.time()),
                )
                added = cur.rowcount == 1
                excess = self._count() - self.max_windows
                if excess > 0:
                    self._db.execute(
                        "DELETE FROM windows WHERE id IN (SELECT id FROM windows ORDER BY id LIMIT ?)", (excess,)
                    )
                    self._add_meta("dropped", excess)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise SpoolError(f"cannot write to spool {self.path}: {exc}") from exc
        if excess > 0:
            log.warning("spool full (%d windows): dropped the %d oldest", self.max_windows, excess)
        return added

    def pending(self, limit: int = 100, exclude: set[int] | None = None) -> list[SpooledWindow]:
        """Oldest spooled windows first, skipping the ids in `exclude` (already in flight)."""
        skip = exclude or set()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, topic, payload, content_type FROM windows ORDER BY id LIMIT ?", (limit + len(skip),)
            ).fetchall()
        return [SpooledWindow(int(r[0]), r[1], r[2], bytes(r[3]), r[4]) for r in rows if r[0] not in skip][:limit]

    def delete(self, window_id: int) -> None:
        """Forget a window the broker acknowledged."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM windows WHERE id = ?", (window_id,))
            except sqlite3.Error as exc:
                # Not fatal: the window stays and is sent again; the server drops the duplicate.
                log.warning("could not delete acknowledged window %d from the spool: %s", window_id, exc)

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0])

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    @property
    def dropped(self) -> int:
        return self.get_meta("dropped")

    def get_meta(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_meta(self, name: str, value: int) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    (name, value),
                )
            except sqlite3.Error as exc:
                log.warning("could not record %s in the spool: %s", name, exc)

    def _add_meta(self, name: str, delta: int) -> None:
        self._db.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, delta),
        )

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def stats(self) -> dict[str, object]:
        return {"path": str(self.path), "pending": len(self), "dropped": self.dropped, "max_windows": self.max_windows,
                "recovered_from": str(self.recovered_from) if self.recovered_from else None}

    def close(self) -> None:
        with self._lock:
            self._db.close()
