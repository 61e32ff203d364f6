"""The capture store and index under the fleet: migration 0004 on a database of the previous schema (SQLite,
and PostgreSQL where exactly-once inserts go through its ON CONFLICT), an fsspec store (`memory://`) with
its quota, and a real full disk (a small tmpfs) under a real `fleet serve`: 507, nothing half-written,
what was stored before still exported intact, uploads resume once there is room."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command

from edge_kit.fleet import migrations
from edge_kit.fleet.captures.index import CaptureIndex, Cursor
from edge_kit.fleet.captures.store import CaptureStore, CaptureStoreFull
from edge_kit.fleet.device_tokens import create_device_key, device_token
from edge_kit.fleet.storage import Storage
from harness.fleetkit import make_bundle
from harness.processes import MosquittoBroker
from tests.edge_kit.fleet.captures_kit import UPLOAD, FleetServe, batch, call, device_headers, export_all, record
from tests.helpers.postgres import PostgresServer


def _rows(n: int, device: str = "dev1", at: float = 1.0) -> list[dict[str, Any]]:
    return [{"id": secrets.token_hex(16), "device": device, "model_sha256": "ab" * 32, "model_version": "1.0.0",
             "window_start": 0.0, "created": 2.0, "request_id": None, "row_index": i, "predicted": 1,
             "label": None, "label_source": None, "shard": "dev1/x.npz", "position": i, "bytes": 256,
             "stored_at": at} for i in range(n)]


def _exactly_once(storage: Storage) -> None:
    index = CaptureIndex(storage)
    rows = _rows(700) + _rows(3, "dev2", at=2.0)  # more than one IN (...) chunk
    assert index.insert(rows) == 703
    assert index.insert(rows[:10]) == 0 and index.insert(rows[:1]) == 0  # replays: nothing new
    assert index.existing([r["id"] for r in rows[695:]] + ["f" * 32]) == {r["id"] for r in rows[695:]}
    assert [(c["device"], c["held"], c["labelled"], c["bytes"]) for c in index.counts()] == [
        ("dev1", 700, 0, 700 * 256), ("dev2", 3, 0, 768)]
    seen: list[str] = []
    after = None
    while True:
        page = index.page(devices=None, since=None, labelled_only=False, after=after, limit=64)
        if not page:
            break
        seen += [p["id"] for p in page]
        after = Cursor(page[-1]["stored_at"], page[-1]["id"])
    assert seen == [r["id"] for r in sorted(rows, key=lambda r: (r["stored_at"], r["id"]))]
    assert index.set_labels("dev2", [(rows[0]["id"], "3")]) == 1  # dev1's record: untouched
    assert index.models_of("dev2", [rows[0]["id"], rows[700]["id"]]) == {rows[700]["id"]: "ab" * 32}
    index.set_labels("dev1", [(rows[0]["id"], "3")])
    assert index.counts()[0]["labelled"] == 1


def test_migration_0004_upgrades_a_0003_sqlite_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrations._config(conn), "0003")
        conn.execute(sa.text("INSERT INTO windows VALUES ('dev0', 'ab', 1.0, 2.0, 0, 5, 'f', 'digits', '1.0.0', "
                             "3.0, x'00', NULL)"))
    engine.dispose()
    storage = Storage(url)
    try:
        assert storage.schema_revision == migrations.head_revision() >= "0004"
        assert storage.window_count() == 1
        _exactly_once(storage)
    finally:
        storage.close()
    engine = sa.create_engine(url)  # and back down: 0004's downgrade drops only its own tables
    with engine.begin() as conn:
        command.downgrade(migrations._config(conn), "0003")
        assert not sa.inspect(conn).has_table("captures") and sa.inspect(conn).has_table("deployments")
    engine.dispose()


@pytest.mark.integration
def test_migration_0004_and_exactly_once_on_postgresql(postgres: PostgresServer) -> None:
    storage = Storage(postgres.url)
    try:
        assert storage.schema_revision == migrations.head_revision()
        with storage.database.write() as conn:
            conn.execute(sa.text("DELETE FROM captures"))
        _exactly_once(storage)
    finally:
        storage.close()


def test_an_fsspec_store_keeps_its_quota_and_never_overwrites(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://captures-{uuid.uuid4().hex}"
    store = CaptureStore(url, 1000)
    store.put("dev1/2026-01-01/a.npz", b"x" * 600)
    with pytest.raises(CaptureStoreFull, match="--captures-max-bytes"):
        store.put("dev1/2026-01-01/b.npz", b"y" * 600)
    assert store.get("dev1/2026-01-01/a.npz") == b"x" * 600
    store.put("dev1/2026-01-01/a.npz", b"x" * 600)  # the same content-named shard again: nothing written
    assert store.used == 600
    assert CaptureStore(url, 1000).used == 600  # a restarted server measures what is there
    with pytest.raises(ValueError):
        store.put("../escape.npz", b"z")
    store.discard("dev1/2026-01-01/a.npz")
    assert store.used == 0
    local = CaptureStore(f"file://{tmp_path}/store", 10)
    with pytest.raises(CaptureStoreFull):
        local.put("d/x.npz", b"q" * 11)
    assert not list((tmp_path / "store").rglob("*"))


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[None]:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the quota test covers the same refusal")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the quota test covers the same refusal")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_disk_is_507_and_loses_nothing(tmp_path: Path) -> None:
    (tmp_path / "bundles").mkdir()
    (tmp_path / "broker").mkdir()
    bundle = make_bundle(tmp_path / "bundles")
    key = create_device_key(tmp_path / "device-token.key")
    headers = device_headers("dev1", device_token(key, "dev1"))
    rng = np.random.default_rng(21)
    store = tmp_path / "store"
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    try:
        with tmpfs(store, "512k"):
            server = FleetServe(tmp_path, broker.url, bundle.path.parent, "--device-key-file",
                                str(tmp_path / "device-token.key"), "--captures", str(store))
            try:
                first = [record(bundle, rng) for _ in range(10)]
                assert call(server.url + UPLOAD, "POST", batch("dev1", first), headers)[1]["stored"] == 10
                filler = _fill(store)
                refused = [record(bundle, rng) for _ in range(50)]
                status, body = call(server.url + UPLOAD, "POST", batch("dev1", refused), headers)
                assert (status, body["error"]) == (507, "capture store full"), body
                assert "disk" in body["detail"]
                assert not [p for p in store.rglob("*") if p.name.endswith(".tmp")]
                assert {r["id"]: r["input"] for r in export_all(server.url)} == {r["id"]: r["input"] for r in first}
                filler.unlink()  # room again: the device's retry goes through, exactly once
                status, body = call(server.url + UPLOAD, "POST", batch("dev1", refused + first[:2]), headers)
                assert (status, body["stored"], body["duplicates"]) == (200, 50, 2)
                assert len(export_all(server.url, limit=100)) == 60
            finally:
                server.stop()
    finally:
        broker.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_fleet_serve_keeps_captures_under_an_fsspec_url(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    (tmp_path / "bundles").mkdir()
    (tmp_path / "broker").mkdir()
    bundle = make_bundle(tmp_path / "bundles")
    key = create_device_key(tmp_path / "device-token.key")
    headers = device_headers("dev1", device_token(key, "dev1"))
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    server = FleetServe(tmp_path, broker.url, bundle.path.parent, "--device-key-file",
                        str(tmp_path / "device-token.key"), "--captures", "memory://fleet-captures")
    try:
        rng = np.random.default_rng(31)
        recs = [record(bundle, rng) for _ in range(12)]
        assert call(server.url + UPLOAD, "POST", batch("dev1", recs), headers)[1]["stored"] == 12
        assert call(server.url + UPLOAD, "POST", batch("dev1", recs), headers)[1]["duplicates"] == 12
        assert {r["id"]: r["input"] for r in export_all(server.url, limit=5)} == {r["id"]: r["input"] for r in recs}
        assert not (tmp_path / "captures").exists()  # nothing beside the database: the URL was used
    finally:
        server.stop()
        broker.stop()
