"""The connection layer under the fleet queries: the Core tables describe the migrated schema, reads never
wait for another process's write lock, and a database that cannot be opened is a usage error."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from edge_kit.errors import UsageError
from edge_kit.fleet import tables
from edge_kit.fleet.storage import Storage, WindowRow, encode_counts
from harness.processes import free_port


def test_core_tables_match_the_migrated_schema(tmp_path: Path) -> None:
    """Rows given as tuples follow the declared column order, so it must be the database's."""
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    inspector = sa.inspect(storage.engine)
    for table in tables.metadata.sorted_tables:
        stored = inspector.get_columns(table.name)
        assert [c["name"] for c in stored] == [c.name for c in table.columns], table.name
        assert [c["nullable"] for c in stored] == [c.nullable for c in table.columns], table.name
        pk = inspector.get_pk_constraint(table.name)["constrained_columns"]
        assert sorted(pk) == sorted(c.name for c in table.primary_key), table.name
    storage.close()


def test_reads_do_not_wait_for_another_process_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    storage = Storage(f"sqlite:///{db}")
    window = WindowRow("dev0", "ab" * 32, 0.0, 60.0, 0, 10, "f", "m", "1", 61.0, encode_counts(np.ones(4)), None)
    assert storage.ingest([window], [], {}) == 1
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer (a second consumer process) holds the write lock
    other.execute("UPDATE counters SET value = value + 100")
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.extend([storage.window_count(), storage.counters()]), daemon=True)
    reader.start()
    reader.join(10)  # a read that took the write lock would wait busy_timeout (30 s), then fail
    assert not reader.is_alive()
    assert found == [1, {"accepted": 1}]  # the committed snapshot, not the other's uncommitted update
    other.execute("COMMIT")
    assert storage.counters() == {"accepted": 101}
    other.close()
    storage.close()


def test_unreachable_postgresql_is_a_usage_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(UsageError, match="cannot connect to PostgreSQL"):
        Storage(f"postgresql://edgekit@127.0.0.1:{free_port()}/fleet?connect_timeout=5")


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite:///no/such/folder/fleet.db"])
def test_unusable_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError, match="--db"):
        Storage(url)
