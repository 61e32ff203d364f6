"""The fleet database connection: SQLite (one file, WAL) or PostgreSQL, behind one SQLAlchemy engine.

`sqlite:///PATH` opens a SQLite file in WAL mode (readers never block the writer, several consumer
processes can share it) with `synchronous=FULL`, so a committed transaction survives a crash of the
process or the machine; `postgresql://...` connects with psycopg (installed separately: `pip install
"psycopg[binary]"`), the URL handed to libpq as it is. Opening a database upgrades its schema to this
code's head revision (`edge_kit.fleet.migrations`) before anything reads it.

One connection is used at a time, behind a lock, so a `Database` may be shared by threads. Statements
run inside `write()` (one transaction; on SQLite it takes the write lock first, `BEGIN IMMEDIATE`, so two
processes never deadlock upgrading a read lock) or `read()` (a deferred transaction: a consistent
snapshot that never blocks a writer). Other fleet modules that keep their own tables use the same two.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import QueuePool, StaticPool

from edge_kit.errors import UsageError
from edge_kit.fleet import migrations

_READ = "edge_kit_read"  # execution option: this transaction only reads (SQLite: a deferred BEGIN)


class Database:
    """An open, migrated fleet database; `dialect` is "sqlite" or "postgresql"."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        if url.startswith("sqlite:///") or url == "sqlite://:memory:":
            self.dialect = "sqlite"
            self.engine = _sqlite_engine(url)
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self.engine = _postgresql_engine(url)
        else:
            raise UsageError(f"--db must be sqlite:///PATH or postgresql://..., got {url!r}")
        try:
            with self._lock:
                self.schema_revision = migrations.upgrade(self.engine)
        except migrations.SchemaTooNew as exc:
            self.engine.dispose()
            raise UsageError(f"--db: {exc}") from exc
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            what = "connect to PostgreSQL" if self.dialect == "postgresql" else "open the SQLite database"
            raise UsageError(f"--db: cannot {what}: {exc.orig}") from exc

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """One transaction that commits on leaving the block (rolled back on an exception)."""
        with self._lock, self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only snapshot for one or several queries."""
        with self._lock, self.engine.connect() as conn:
            conn.execution_options(**{_READ: True})
            with conn.begin():
                yield conn

    def insert(self, table: sa.Table) -> sqlite_dialect.Insert | pg_dialect.Insert:
        """An INSERT that knows `ON CONFLICT` (both dialects spell it the same; SQLAlchemy's constructs differ)."""
        return (sqlite_dialect.insert if self.dialect == "sqlite" else pg_dialect.insert)(table)

    def close(self) -> None:
        with self._lock:
            self.engine.dispose()


def _sqlite_engine(url: str) -> sa.Engine:
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ":memory:"
    if path != ":memory:" and not Path(path).parent.is_dir():
        raise UsageError(f"--db: folder {Path(path).parent} does not exist")

    def connect() -> sqlite3.Connection:
        # isolation_level=None: pysqlite opens no transactions of its own; the "begin" hook below does.
        conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # One connection for the process (a :memory: database has no other), used under the lock.
    engine = sa.create_engine("sqlite://", creator=connect, poolclass=StaticPool)

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ) else "BEGIN IMMEDIATE")

    return engine


def _postgresql_engine(url: str) -> sa.Engine:
    try:
        import psycopg  # optional: only PostgreSQL deployments need it
    except ImportError as exc:
        raise UsageError("--db postgresql:// needs psycopg: pip install 'psycopg[binary]'") from exc

    def connect() -> Any:
        return psycopg.connect(url)

    # One pooled connection (used under the lock); one lost with the server is replaced on next use.
    return sa.create_engine("postgresql+psycopg://", creator=connect, poolclass=QueuePool, pool_size=1,
                            max_overflow=0)
