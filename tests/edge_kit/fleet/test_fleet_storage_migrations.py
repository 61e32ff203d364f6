"""The fleet schema is versioned: a database of the schema before versioning (checked-in fixtures made
by edge-kit at commit 35a2645, see data/make_unversioned_db.py) is upgraded on start and keeps its data."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from edge_kit.errors import UsageError
from edge_kit.fleet import migrations
from edge_kit.fleet.storage import Storage, WindowRow, decode_counts, encode_counts
from tests.helpers.postgres import PostgresServer

DATA = Path(__file__).resolve().parent / "data"
SHA = "ab" * 32  # what the fixture script stored
T0 = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[3]


def assert_fixture_data_kept(storage: Storage) -> None:
    """Every row make_unversioned_db.py wrote, read back through the public API after the upgrade."""
    assert storage.schema_revision == migrations.head_revision()
    assert storage.window_count() == 12 and storage.window_count(SHA) == 12
    assert storage.counters() == {"accepted": 12, "duplicate": 1, "rejected": 2}
    rows = storage.windows(SHA, 0.0, device="dev2")
    assert [r[1] for r in rows] == [T0 + 60.0 * w for w in range(4)]
    counts = decode_counts([bytes(r[4]) for r in rows], 8)
    assert counts.tolist() == [(np.arange(8) * 3 + w).tolist() for w in range(4)]
    devices = {d["device"]: d for d in storage.devices()}
    assert sorted(devices) == ["dev0", "dev1", "dev2"]
    assert devices["dev1"]["state"] == "offline" and devices["dev1"]["status"] == {"state": "offline",
                                                                                 "reason": "fixture"}
    labels = sorted(storage.labels(SHA, 0.0))
    assert [d for d, _ in labels] == ["dev0"] * 4 + ["dev2"]
    assert np.frombuffer(labels[-1][1], dtype=np.int64).tolist() == [3, 1, 0, 4]
    assert storage.evaluation(SHA) == {"evaluated_at": T0 + 500.0, "cutoff": T0, "bundle": "digits-1.0.0"}
    assert [r["p_value"] for r in storage.fleet_drift(SHA)] == [0.03]
    assert [(r["device"], r["drifted"], r["channels"]) for r in storage.device_drift(SHA)] == [
        ("dev0", True, ["class_0"])]
    alerts = storage.alerts()
    assert [(a["id"], a["state"], a["approved_by"]) for a in alerts] == [(2, "retrain_failed", None),
                                                                        (1, "approved", "carol")]
    assert [(t["outcome"], t["returncode"], t["output"]) for t in alerts[1]["triggers"]] == [("succeeded", 0, "done\n")]
    # The stores keep working on the upgraded schema: ids continue after the old ones (not reused), a
    # re-delivered old window is still a duplicate, a new one is stored.
    assert storage.create_alert(SHA, "fleet", "concept", "open", "new", {}) == 3
    assert storage.add_trigger(3, ["x"], "running") == 3
    old = rows[0]
    dup = WindowRow("dev2", SHA, old[1], old[2], 0, 102, "test", "digits", "1.0.0", T0, bytes(old[4]), None)
    new = WindowRow("dev9", SHA, T0, T0 + 60, 0, 5, "test", "digits", "1.0.0", T0, encode_counts(np.ones(8)), None)
    assert storage.ingest([dup, new], [], {}) == 1
    assert storage.counters()["duplicate"] == 2 and storage.window_count() == 13


def schema_of(url: str) -> dict[str, Any]:
    """Tables -> columns (name, nullable), primary key, and index columns: what the queries rely on.

    A primary-key column counts as NOT NULL: the old SQLite DDL left `TEXT PRIMARY KEY` nullable (a
    SQLite quirk), the new one says NOT NULL; no row has a NULL key either way.
    """
    engine = sa.create_engine(url)
    try:
        insp = sa.inspect(engine)
        pks = {t: insp.get_pk_constraint(t)["constrained_columns"] for t in insp.get_table_names()}
        return {t: ([(c["name"], c["nullable"] and c["name"] not in pks[t]) for c in insp.get_columns(t)], pks[t],
                    sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(t)))
                for t in insp.get_table_names()}
    finally:
        engine.dispose()


def test_unversioned_sqlite_database_is_upgraded_and_keeps_its_data(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    shutil.copy(DATA / "fleet-unversioned.sqlite", db)
    storage = Storage(f"sqlite:///{db}")
    try:
        assert_fixture_data_kept(storage)
    finally:
        storage.close()
    # Reopening finds it current and changes nothing.
    again = Storage(f"sqlite:///{db}")
    assert again.window_count() == 13
    again.close()


def test_upgraded_and_fresh_sqlite_schemas_are_the_same(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    shutil.copy(DATA / "fleet-unversioned.sqlite", old)
    Storage(f"sqlite:///{old}").close()
    Storage(f"sqlite:///{tmp_path}/new.db").close()
    upgraded, fresh = schema_of(f"sqlite:///{old}"), schema_of(f"sqlite:///{tmp_path}/new.db")
    assert upgraded == fresh
    assert ("labels_by_model_time", ("model_sha256", "received_at")) in fresh["labels"][2]


def test_a_schema_newer_than_the_code_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    Storage(f"sqlite:///{db}").close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'")
    with pytest.raises(UsageError, match=r"^--db: the database schema is at revision 9999, newer than") as err:
        Storage(f"sqlite:///{db}")
    assert err.value.exit_code == 2
    with sqlite3.connect(db) as conn:
        assert conn.execute(f"SELECT version_num FROM {migrations.VERSION_TABLE}").fetchall() == [("9999",)]


@pytest.mark.slow
def test_concurrent_starts_on_one_new_database_upgrade_it_once(tmp_path: Path) -> None:
    """`fleet serve --workers N` starts N consumers at once on one SQLite file: none may fail."""
    db = tmp_path / "fleet.db"
    code = ("import sys; from edge_kit.fleet.storage import Storage; s = Storage(sys.argv[1]); "
            "print(s.schema_revision); s.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {migrations.head_revision()}
    with sqlite3.connect(db) as conn:
        assert conn.execute(f"SELECT version_num FROM {migrations.VERSION_TABLE}").fetchall() == [
            (migrations.head_revision(),)]


@pytest.mark.integration
def test_unversioned_postgres_database_is_upgraded_and_keeps_its_data(postgres: PostgresServer) -> None:
    import psycopg

    name = f"fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((DATA / "fleet-unversioned.pgsql").read_text())
    storage = Storage(url)
    try:
        assert_fixture_data_kept(storage)
    finally:
        storage.close()
    fresh = f"fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {fresh}")
    fresh_url = postgres.url.rsplit("/", 1)[0] + f"/{fresh}"
    Storage(fresh_url).close()
    assert (schema_of(url.replace("postgresql://", "postgresql+psycopg://"))
            == schema_of(fresh_url.replace("postgresql://", "postgresql+psycopg://")))
