"""The SQLite spool and the forwarder: durable, bounded, idempotent, and robust to bad disks."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_agent.errors import EdgeKitError, SpoolError
from device_agent.uplink.connection import Backoff
from device_agent.uplink.forwarder import Forwarder
from device_agent.uplink.spool import Spool
from device_agent.uplink.transport import MemoryPublisher, Message
from device_agent.uplink.wire import parse_broker_url
from harness.processes import cli_env


def test_put_is_idempotent_and_fifo(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    assert spool.put("k1", "t", b"one", "application/json")
    assert not spool.put("k1", "t", b"one again", "application/json")  # same idempotency key
    spool.put("k2", "t", b"two", "application/json")
    pending = spool.pending()
    assert [w.key for w in pending] == ["k1", "k2"] and pending[0].payload == b"one"
    assert [w.key for w in spool.pending(exclude={pending[0].id})] == ["k2"]
    spool.delete(pending[0].id)
    assert len(spool) == 1


def test_the_spool_is_bounded_dropping_the_oldest_and_counting(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_windows=3)
    for i in range(5):
        spool.put(f"k{i}", "t", b"x", "application/json")
    assert [w.key for w in spool.pending()] == ["k2", "k3", "k4"]
    assert spool.dropped == 2
    spool.close()
    assert Spool(tmp_path / "s.db", max_windows=3).dropped == 2  # the count is durable too


def test_a_spooled_window_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    code = textwrap.dedent(f"""
        import os, signal
        from device_agent.uplink.spool import Spool
        s = Spool({str(path)!r})
        s.put("k-survivor", "edgekit/f/d/summary", b"payload", "application/json+zlib")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, timeout=60)
    assert proc.returncode == -9
    [window] = Spool(path).pending()
    assert (window.key, window.payload, window.content_type) == ("k-survivor", b"payload", "application/json+zlib")


def test_a_corrupt_spool_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database" * 100)
    spool = Spool(path)
    assert spool.recovered_from is not None and spool.recovered_from.read_bytes().startswith(b"this is not")
    assert spool.put("k", "t", b"x", "application/json") and len(spool) == 1
    assert spool.stats()["recovered_from"] == str(spool.recovered_from)


_HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    # Exclusive locking mode: even readers are kept out, as a backup tool or a second agent mid-write does.
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
    db.execute("INSERT INTO meta (name, value) VALUES ('holder', 1) ON CONFLICT(name) DO UPDATE SET value = 1")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
""")


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """A real second process holding SQLite's exclusive lock on the spool for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _spool_with_windows(path: Path, n: int) -> None:
    spool = Spool(path)
    for i in range(n):
        spool.put(f"k{i}", "t", f"w{i}".encode(), "application/json")
    spool.close()


@pytest.mark.slow
def test_a_spool_locked_by_another_process_is_refused_clearly_not_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _spool_with_windows(path, 3)
    holder = _hold_lock(path, 60)
    try:
        with pytest.raises(EdgeKitError) as err:
            Spool(path)  # the default wait, then a clear error
        assert err.value.exit_code == 2 and "locked by another process" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    assert not list(tmp_path.glob("*corrupt*"))
    assert [w.payload for w in Spool(path).pending()] == [b"w0", b"w1", b"w2"]  # nothing lost


def test_a_spool_locked_for_a_moment_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _spool_with_windows(path, 2)
    holder = _hold_lock(path, 1.0)
    try:
        spool = Spool(path, lock_timeout=20)
        assert spool.recovered_from is None and len(spool) == 2
    finally:
        holder.wait(timeout=30)
    assert not list(tmp_path.glob("*corrupt*"))


def _fill_disk(spool: Spool) -> None:
    """Make the database refuse to grow, as a full disk does ("database or disk is full")."""
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_disk_loses_no_window_while_the_agent_runs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    publisher = MemoryPublisher(is_connected=False)
    forwarder = Forwarder(spool, publisher)
    _fill_disk(spool)
    big = b"x" * 200_000
    with pytest.raises(SpoolError, match="full"):
        spool.put("direct", "t", big, "application/json")
    assert not forwarder.submit("k-full", Message("t", big))
    assert forwarder.stats()["unspooled"] == 1 and "full" in str(forwarder.last_spool_error)
    forwarder.pump()  # the disk is still full: kept in memory
    assert forwarder.stats()["unspooled"] == 1
    spool._db.execute("PRAGMA max_page_count = 1073741823")  # space freed
    publisher.is_connected = True
    assert forwarder.pump() == 1
    assert forwarder.stats()["unspooled"] == 0
    assert publisher.messages[0].payload == big and len(spool) == 0


def test_in_flight_windows_without_an_answer_are_sent_again(tmp_path: Path) -> None:
    now = [0.0]
    publisher = MemoryPublisher(auto_ack=False)
    forwarder = Forwarder(Spool(tmp_path / "s.db"), publisher, resend_after=30, clock=lambda: now[0])
    forwarder.submit("k", Message("t", b"p"))
    assert forwarder.pump() == 1
    publisher.reconnect()  # the connection died with the PUBACK
    now[0] = 10
    assert forwarder.pump() == 0
    now[0] = 31
    assert forwarder.pump() == 1  # at-least-once: the server drops the duplicate by key
    publisher.ack_all()
    assert len(forwarder.spool) == 0


def test_a_refused_publish_stays_spooled_and_is_retried_at_a_pace(tmp_path: Path) -> None:
    now = [0.0]
    publisher = MemoryPublisher(auto_ack=False)
    forwarder = Forwarder(Spool(tmp_path / "s.db"), publisher, retry_refused=5, clock=lambda: now[0])
    forwarder.submit("k", Message("t", b"p"))
    forwarder.pump()
    publisher.ack_all(ok=False)  # refused, or PUBACK "no matching subscribers"
    assert len(forwarder.spool) == 1
    # Not hammered every pass (a broker without subscribers answers every publish the same way)...
    now[0] = 4
    assert forwarder.pump() == 0
    # ...but sent again after `retry_refused`, and deleted once it is taken.
    now[0] = 6
    assert forwarder.pump() == 1
    publisher.ack_all()
    assert len(forwarder.spool) == 0


def test_backoff_doubles_with_jitter_and_resets() -> None:
    import random

    b = Backoff(1.0, 8.0, random.Random(0))
    waits = [b.next() for _ in range(6)]
    for w, ceiling in zip(waits, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= w <= ceiling
    assert len(set(waits)) == 6  # jittered, not lock-step
    b.reset()
    assert 0.5 <= b.next() <= 1.0


def test_broker_urls() -> None:
    c = parse_broker_url("mqtt://127.0.0.1:1999")
    assert (c.host, c.port, c.tls) == ("127.0.0.1", 1999, False)
    c = parse_broker_url("mqtts://u:p@broker.example")
    assert (c.port, c.tls, c.username, c.password) == (8883, True, "u", "p")
    from device_agent.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mqtt\.broker"):
        parse_broker_url("http://x:1", what="mqtt.broker")


def test_spool_is_sqlite_in_wal_mode(tmp_path: Path) -> None:
    Spool(tmp_path / "s.db").put("k", "t", b"x", "application/json")
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
