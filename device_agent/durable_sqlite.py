"""The device's durable SQLite files (the window spool, the capture spool), opened one way.

WAL with `synchronous=FULL`, so a committed row survives kill -9 and power loss; SQLite's busy wait
(`lock_timeout`), so a file another process holds is waited for, not mistaken for damage. A file SQLite
calls damaged (or that fails `quick_check`) is moved aside with its -wal/-shm and a new one started;
any other failure to open (locked, permissions) keeps the file and is SpoolUnavailableError (exit 2).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import UsageError

log = logging.getLogger(__name__)

# SQLite primary result codes that mean the file itself is damaged (everything else, BUSY and
# LOCKED above all, says nothing about the rows inside it).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


class SpoolUnavailableError(UsageError):
    """A spool exists but cannot be opened now (locked by another process, permissions): exit 2."""


class CorruptDatabase(sqlite3.DatabaseError):
    """quick_check found damage."""


@dataclass(frozen=True)
class DurableFile:
    """How errors name one kind of file: what it is, what it holds, and the setting that points at it."""

    what: str  # "spool", "capture spool"
    holds: str  # "windows", "records"
    setting: str  # "--spool", "capture.state_dir"


def is_corruption(exc: sqlite3.Error) -> bool:
    """True only when SQLite says the file is damaged, not when it is busy, locked or unreadable."""
    if isinstance(exc, CorruptDatabase):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def open_durable(path: Path, schema: str, kind: DurableFile, *,
                 lock_timeout: float) -> tuple[sqlite3.Connection, Path | None]:
    """The open connection (autocommit; the caller runs its own transactions) and, when the file was
    damaged, where it was moved to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _open(path, schema, lock_timeout), None
    except sqlite3.Error as exc:
        if not is_corruption(exc):
            raise _unavailable(path, kind, lock_timeout, exc) from exc
        aside = _move_aside(path, kind, exc)
        try:
            return _open(path, schema, lock_timeout), aside
        except sqlite3.Error as again:
            raise _unavailable(path, kind, lock_timeout, again) from again


def _open(path: Path, schema: str, lock_timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=lock_timeout)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
        row = db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise CorruptDatabase(f"integrity check failed: {row}")
    except sqlite3.Error:
        db.close()
        raise
    return db


def _unavailable(path: Path, kind: DurableFile, lock_timeout: float, exc: sqlite3.Error) -> SpoolUnavailableError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return SpoolUnavailableError(
            f"{kind.what} {path} is locked by another process (waited {lock_timeout:g}s); its {kind.holds} are kept",
            hint=f"is another edge-agent running with the same {kind.setting}?")
    return SpoolUnavailableError(f"cannot open {kind.what} {path}: {exc}; its {kind.holds} are kept")


def _move_aside(path: Path, kind: DurableFile, exc: Exception) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    log.error("%s %s is not a readable database (%s); moved it to %s and started a new one", kind.what, path, exc,
              aside)
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    return aside
