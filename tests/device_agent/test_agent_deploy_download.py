"""The deployment download client against a real HTTP server (and a real proxy that cuts the link)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from device_agent.deploy.download import (
    DownloadFailed,
    DownloadPolicy,
    DownloadStats,
    download,
    part_path,
    staged_path,
)
from harness.bundle_server import BundleServer
from tests.helpers.tcp_proxy import CuttingProxy

SIZE = 300_000
FAST = DownloadPolicy(timeout=10, give_up_after=60, backoff_min=0.05, backoff_max=0.2)


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    data = np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.edgebundle"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> BundleServer:
    srv = BundleServer().start()
    yield srv
    srv.stop()


def _get(server: BundleServer, sha: str, staging: Path, **kw: object) -> Path:
    return download(server.url(sha), sha256=sha, size=SIZE, staging=staging, device_id="dev-1",
                    max_bytes=10 * SIZE, policy=kw.pop("policy", FAST), **kw)  # type: ignore[arg-type]


def test_downloads_verifies_and_names_the_file_by_its_hash(tmp_path, blob, server):
    path, sha = blob
    server.add(path)
    got = _get(server, sha, tmp_path / "staging")
    assert got == staged_path(tmp_path / "staging", sha)
    assert got.read_bytes() == path.read_bytes()
    assert not part_path(tmp_path / "staging", sha).exists()
    assert server.served.requests[0]["device"] == "dev-1"
    # A second call finds the verified file and asks the server for nothing.
    _get(server, sha, tmp_path / "staging")
    assert len(server.served.requests) == 1


def test_a_kept_part_is_resumed_with_a_range_request(tmp_path, blob, server):
    path, sha = blob
    server.add(path)
    staging = tmp_path / "staging"
    staging.mkdir()
    part_path(staging, sha).write_bytes(path.read_bytes()[:120_000])
    stats = DownloadStats()
    got = _get(server, sha, staging, stats=stats)
    assert got.read_bytes() == path.read_bytes()
    assert stats.resumed_from == 120_000
    assert server.served.requests[0]["range"] == "bytes=120000-"
    assert server.served.bytes_sent(sha) == SIZE - 120_000


def test_a_cut_link_resumes_where_it_broke(tmp_path, blob, server):
    path, sha = blob
    server.add(path)
    proxy = CuttingProxy(server.port, cut_after=100_000, cuts=2)
    try:
        stats = DownloadStats()
        got = download(f"http://127.0.0.1:{proxy.port}/api/bundles/{sha}", sha256=sha, size=SIZE,
                       staging=tmp_path / "s", device_id="dev-1", max_bytes=SIZE, policy=FAST, stats=stats)
    finally:
        proxy.close()
    assert got.read_bytes() == path.read_bytes()
    assert proxy.cut == 2 and stats.requests == 3
    starts = _range_starts(server)
    assert starts[0] == 0 and 0 < starts[1] < starts[2] < SIZE  # each retry asks only for the rest
    assert stats.received == SIZE  # no byte fetched twice


def _range_starts(server: BundleServer) -> list[int]:
    return [int(r["range"].removeprefix("bytes=").rstrip("-")) if r["range"] else 0 for r in server.served.requests]


def test_altered_bytes_are_refused_for_good_and_deleted(tmp_path, blob, server):
    path, sha = blob
    server.add(path)
    server.alter.add(sha)
    with pytest.raises(DownloadFailed, match="sha256") as info:
        _get(server, sha, tmp_path / "staging")
    assert info.value.permanent
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_wrong_kept_prefix_costs_one_fresh_download_not_a_failure(tmp_path, blob, server):
    path, sha = blob
    server.add(path)
    staging = tmp_path / "staging"
    staging.mkdir()
    part_path(staging, sha).write_bytes(b"\0" * 50_000)  # torn write: not the file's first bytes
    got = _get(server, sha, staging)
    assert got.read_bytes() == path.read_bytes()
    assert server.served.bytes_sent(sha) == (SIZE - 50_000) + SIZE


def test_size_over_the_cap_is_refused_before_any_request(tmp_path, blob, server):
    path, sha = blob
    server.add(path)
    with pytest.raises(DownloadFailed, match="cap") as info:
        download(server.url(sha), sha256=sha, size=SIZE, staging=tmp_path / "s", device_id="d", max_bytes=SIZE - 1)
    assert info.value.permanent and server.served.requests == []


def test_not_found_is_permanent(tmp_path, server):
    with pytest.raises(DownloadFailed, match="404") as info:
        _get(server, "0" * 64, tmp_path / "s")
    assert info.value.permanent


def test_busy_server_retry_after_is_honoured(tmp_path, blob):
    path, sha = blob
    server = BundleServer(throttle=400_000, max_concurrent=1, retry_after=1).start()
    try:
        server.add(path)
        first = threading.Thread(target=_get, args=(server, sha, tmp_path / "a"))
        first.start()
        while not server.served.requests:
            threading.Event().wait(0.01)
        stats = DownloadStats()
        got = _get(server, sha, tmp_path / "b", stats=stats)
        first.join(30)
    finally:
        server.stop()
    assert got.read_bytes() == path.read_bytes()
    assert server.served.count(503) >= 1 and 1.0 in stats.waits
    assert server.peak_concurrent == 1


def test_unreachable_server_gives_up_as_transient(tmp_path, blob):
    _, sha = blob
    policy = DownloadPolicy(timeout=1, give_up_after=0.5, backoff_min=0.1, backoff_max=0.2)
    with pytest.raises(DownloadFailed) as info:
        download("http://127.0.0.1:9/api/bundles/x", sha256=sha, size=SIZE, staging=tmp_path / "s",
                 device_id="d", max_bytes=SIZE, policy=policy)
    assert not info.value.permanent


def test_stop_interrupts_and_keeps_the_part(tmp_path, blob):
    path, sha = blob
    server = BundleServer(throttle=100_000).start()
    stop = threading.Event()
    try:
        server.add(path)
        threading.Timer(0.8, stop.set).start()
        with pytest.raises(DownloadFailed, match="stopped"):
            _get(server, sha, tmp_path / "s", stop=stop)
    finally:
        server.stop()
    kept = part_path(tmp_path / "s", sha).stat().st_size
    assert 0 < kept < SIZE
