"""The capture spool: bounded with the oldest dropped first (counted, durably), labels in the spool and
as label updates, and records that survive a real kill -9 of the process writing them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from device_agent.capture.capture import Capture
from device_agent.capture.config import CaptureSettings
from device_agent.capture.store import CaptureStore, NewRecord
from harness.processes import cli_env


def record(i: int, request_id: str | None = None, size: int = 100) -> NewRecord:
    doc = json.dumps({"id": f"{i:032x}", "pad": "x" * size, "label": None}, separators=(",", ":"))
    return NewRecord(f"{i:032x}", request_id, i, 1000.0, doc)


def test_the_spool_is_bounded_oldest_dropped_first_and_the_count_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "captures.db"
    one = len(record(0).doc)
    store = CaptureStore(path, max_bytes=5 * one)
    for i in range(4):
        assert store.put([record(i)]) == 0
    assert store.put([record(4), record(5), record(6)]) == 2  # 7 records of one size, room for 5
    batch = store.next_batch(100, 1 << 20)
    assert batch.ids == [f"{i:032x}" for i in range(2, 7)]
    assert store.pending() == {"records": 5, "bytes": 5 * one, "labels": 0}
    assert store.counters()["dropped_full"] == 2
    store.close()
    again = CaptureStore(path, max_bytes=5 * one)
    assert again.counters()["dropped_full"] == 2 and again.pending()["records"] == 5


def test_batches_respect_records_and_bytes_and_a_big_record_goes_alone(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    store.put([record(0, size=5000)] + [record(i) for i in range(1, 10)])
    first = store.next_batch(4, 1000)
    assert len(first.ids) == 1  # over the byte limit alone: still sent, alone
    store.ack(first)
    second = store.next_batch(4, 1 << 20)
    assert len(second.ids) == 4
    body = json.loads("[" + ",".join(second.docs) + "]")
    assert [r["id"] for r in body] == second.ids


def test_labels_go_into_spooled_records_and_become_updates_after_upload(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    store.put([record(0, "req"), record(1, "req"), record(2, None)])
    first = store.next_batch(1, 1 << 20)  # record 0 goes out ...
    assert store.label("req", ["a", "b"]) == (2, 0)  # ... and is labelled while on its way
    store.ack(first)  # its label arrived after it was sent: it becomes a label update
    labels = store.next_labels(100)
    assert labels.labels == [(f"{0:032x}", "a")]
    rest = store.next_batch(10, 1 << 20)
    docs = [json.loads(d) for d in rest.docs]
    assert [(d["id"], d["label"]) for d in docs] == [(f"{1:032x}", "b"), (f"{2:032x}", None)]
    store.ack(rest)
    assert store.label("req", ["c", "d"]) == (0, 2)  # both uploaded now: two updates (0's replaced)
    labels = store.next_labels(100)
    assert sorted(labels.labels) == [(f"{0:032x}", "c"), (f"{1:032x}", "d")]
    store.label("req", ["e", "d"])  # a newer label for 0 while the updates are on their way
    store.ack_labels(labels)
    assert store.next_labels(100).labels == [(f"{0:032x}", "e")]  # kept: the fleet has "c", not "e"
    counters = store.counters()
    assert counters["uploaded"] == 3 and counters["labels_sent"] == 1


def test_rejected_and_dropped_records_are_counted_and_never_labelled_later(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    store.put([record(i, "r") for i in range(4)])
    batch = store.next_batch(2, 1 << 20)
    store.ack(batch, rejected={batch.ids[0]})
    store.drop(store.next_batch(2, 1 << 20))
    counters = store.counters()
    assert (counters["uploaded"], counters["rejected"]) == (1, 3)
    assert store.label("r", ["x"] * 4) == (0, 1)  # only the record the fleet holds


def test_fleet_requests_are_remembered_once(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    assert store.honour("req-1", 10, 10, 1.0)
    assert not store.honour("req-1", 10, 20, 2.0)
    store.close()
    again = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    assert again.honoured("req-1") and not again.honoured("req-2")
    assert again.counters()["requested_remaining"] == 10 and again.counters()["requests_honoured"] == 1


def test_deferred_counters_reach_the_disk_with_the_next_write_or_close(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    store.defer(adds={"skipped_budget": 3}, sets={"budget_used": 7})
    assert store.counters()["skipped_budget"] == 3  # shown at once
    store.close()
    again = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    assert again.counters()["skipped_budget"] == 3 and again.counters()["budget_used"] == 7


def test_captured_records_survive_kill_9(tmp_path: Path) -> None:
    """A real child process captures rows (every row sampled) and says how many `offer` returned; it is
    SIGKILLed from outside while still capturing. Every record it reported is in the spool afterwards."""
    state = tmp_path / "capture"
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from pathlib import Path
        from device_agent.capture.capture import Capture
        from device_agent.capture.config import CaptureSettings
        from device_agent.capture.store import CaptureStore
        settings = CaptureSettings(enabled=True, fraction=1.0, bytes_per_day=1 << 40)
        store = CaptureStore(Path({str(state / "captures.db")!r}), max_bytes=1 << 30)
        capture = Capture(settings, fleet="f", device_id="d", store=store, seed=0)
        x = np.arange(4 * 64, dtype=np.float32).reshape(4, 1, 8, 8)
        out = np.eye(4, 10, dtype=np.float32)
        done = 0
        while True:
            done += capture.offer(x, out, out.argmax(1), f"req-{{done}}", 100.0, "ab" * 32)
            print(done, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    reported = 0
    deadline = time.monotonic() + 60
    while reported < 200 and time.monotonic() < deadline:
        line = child.stdout.readline()
        assert line, "the child stopped before it was killed"
        reported = int(line)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    store = CaptureStore(state / "captures.db", max_bytes=1 << 30)
    held = store.pending()["records"]
    assert held >= reported >= 200  # all it reported, perhaps a batch more that it had no time to report
    batch = store.next_batch(1000, 1 << 30)
    first = json.loads(batch.docs[0])
    data = np.frombuffer(base64.b64decode(first["input"]["data"]), dtype="<f4")
    assert first["input"]["shape"] == [1, 8, 8] and data.tolist() == list(range(64))
    assert len(set(batch.ids)) == len(batch.ids) and all(len(i) == 32 for i in batch.ids)
    assert store.counters()["captured"] == held


def test_capture_keeps_nothing_for_a_row_with_a_non_finite_output(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    capture = Capture(CaptureSettings(enabled=True, fraction=1.0), fleet="f", device_id="d", store=store)
    out = np.zeros((3, 10), np.float32)
    out[1, 2] = np.nan
    assert capture.offer(np.zeros((3, 1, 8, 8), np.float32), out, np.zeros(3, np.int64), None, 0.0, "a" * 64) == 2
    assert capture.status()["skipped_nonfinite"] == 1


def test_a_reused_request_id_labels_only_its_newest_call(tmp_path: Path) -> None:
    """As for the agent's own labels: labels naming a request id are for the newest call that used it."""
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    capture = Capture(CaptureSettings(enabled=True, fraction=1.0), fleet="f", device_id="d", store=store)
    x, out, classes = np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 10), np.float32), np.zeros(2, np.int64)
    capture.offer(x, out, classes, "same", 0.0, "a" * 64)
    first = store.next_batch(10, 1 << 20)
    store.ack(first)  # the first call's records are uploaded ...
    capture.offer(x, out, classes, "same", 0.0, "a" * 64)  # ... and the id is used again
    assert capture.label("same", ["1", "2"]) == 2
    assert store.pending()["labels"] == 0  # no label update for the first call's records
    assert [json.loads(d)["label"] for d in store.next_batch(10, 1 << 20).docs] == ["1", "2"]
    assert capture.label("never-seen", ["1"]) == 0


def test_a_damaged_capture_spool_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "captures.db"
    path.write_bytes(b"this is not a database" * 100)
    store = CaptureStore(path, max_bytes=1 << 20)
    assert store.recovered_from is not None and store.recovered_from.read_bytes().startswith(b"this is not")
    assert store.put([record(0)]) == 0 and store.pending()["records"] == 1
    store.close()


def test_a_capture_spool_that_fails_its_integrity_check_is_moved_aside(tmp_path: Path) -> None:
    """A file SQLite opens but `quick_check` calls damaged: moved aside too, not refused as unavailable."""
    import sqlite3

    path = tmp_path / "captures.db"
    CaptureStore(path, max_bytes=1 << 20).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA writable_schema=ON")
    # An index whose root page is the table's own: quick_check reports it, opening does not fail.
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'").fetchone()[0]
    db.execute("CREATE TABLE IF NOT EXISTS t_bad (x)")
    db.execute("UPDATE sqlite_master SET rootpage = ? WHERE name = 't_bad'", (root,))
    db.commit()
    db.close()
    store = CaptureStore(path, max_bytes=1 << 20)
    assert store.recovered_from is not None
    store.close()
