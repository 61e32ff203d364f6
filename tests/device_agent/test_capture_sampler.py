"""Which rows are captured: `fraction` (seeded statistics), the day's byte budget, fleet requests (honoured
once per id, capped by `max_requested`, ignored unless `fleet_requests`), and hostile request messages."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from device_agent.capture.capture import Capture
from device_agent.capture.config import CaptureSettings
from device_agent.capture.request import CaptureRequest, encode_capture_request, parse_capture_request
from device_agent.capture.sampler import DAY_S, Sampler
from device_agent.capture.store import CaptureStore
from device_agent.errors import PayloadError

ROW = np.zeros((1, 8, 8), np.float32).nbytes  # 256 bytes of input per captured row
SHA = "ab" * 32
DAY0 = 20_000 * DAY_S  # midnight UTC


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock | None = None, **settings: object) -> Capture:
    store = CaptureStore(tmp_path / "captures.db", max_bytes=1 << 30)
    return Capture(CaptureSettings(enabled=True, **settings), fleet="demo", device_id="dev-1",  # type: ignore[arg-type]
                   store=store, seed=7, clock=clock or Clock(DAY0 + 10))


def offer(capture: Capture, n: int, request_id: str | None = None) -> int:
    x = np.zeros((n, 1, 8, 8), np.float32)
    out = np.zeros((n, 10), np.float32)
    return capture.offer(x, out, np.zeros(n, np.int64), request_id, 0.0, SHA)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.2, 0.9])
def test_the_share_kept_is_fraction_within_sampling_error(fraction: float) -> None:
    for seed in range(3):
        sampler = Sampler(fraction, 1 << 40, seed=seed)
        sizes = [1] * 20_000 + [7] * 5_000 + [512] * 200  # small and large batches
        kept = 0
        for n in sizes:
            rows, _ = sampler.choose(n)
            if rows is not None:
                assert rows.min() >= 0 and rows.max() < n and (np.diff(rows) > 0).all()
                kept += len(rows)
        total = sum(sizes)
        sd = (total * fraction * (1 - fraction)) ** 0.5
        assert abs(kept - total * fraction) < 5 * sd + 1, (seed, kept, total * fraction)


def test_rows_are_kept_independently_of_their_position_in_the_batch() -> None:
    sampler = Sampler(0.25, 1 << 40, seed=1)
    hits = np.zeros(8)
    for _ in range(20_000):
        rows, _ = sampler.choose(8)
        if rows is not None:
            hits[rows] += 1
    assert np.allclose(hits / 20_000, 0.25, atol=0.02)


def test_fraction_zero_keeps_nothing_and_one_keeps_everything() -> None:
    assert Sampler(0.0, 1 << 40, seed=0).choose(10_000) == (None, 0)
    rows, _ = Sampler(1.0, 1 << 40, seed=0).choose(100)
    assert rows is not None and rows.tolist() == list(range(100))


def test_a_tiny_fraction_draws_gaps_near_the_int64_limit_without_overflow() -> None:
    for fraction in (1e-300, 1e-20):
        sampler = Sampler(fraction, 1 << 40, seed=0)
        assert all(sampler.choose(1 << 20) == (None, 0) for _ in range(100))
        sampler._next = 3.0  # as if the next kept row were close: the gaps after it are ~2**63
        rows, _ = sampler.choose(10)
        assert rows is not None and rows.tolist() == [3] and sampler._next > 1e18


def test_the_day_budget_caps_captured_bytes_per_utc_day_and_resets_at_midnight(tmp_path: Path) -> None:
    clock = Clock(DAY0 + 3600)
    capture = make(tmp_path, clock, fraction=1.0, bytes_per_day=10 * ROW)
    assert offer(capture, 6) == 6
    assert offer(capture, 6) == 4  # 10 rows of budget
    assert offer(capture, 3) == 0
    status = capture.status()
    assert (status["captured"], status["skipped_budget"], status["budget"]["used_bytes"]) == (10, 5, 10 * ROW)
    assert status["budget"]["day"] == "2024-10-04"
    clock.now = DAY0 + DAY_S + 1  # the next UTC day
    assert offer(capture, 3) == 3
    capture.stop()
    # The day's use is on disk: a restart the same day does not get a fresh budget.
    again = make(tmp_path, clock, fraction=1.0, bytes_per_day=10 * ROW)
    assert offer(again, 20) == 7
    assert again.status()["skipped_budget"] == 5 + 13


def test_a_fleet_request_takes_the_next_rows_once_per_id_capped_by_max_requested(tmp_path: Path) -> None:
    capture = make(tmp_path, fraction=0.0, fleet_requests=True, max_requested=5)
    message = encode_capture_request(CaptureRequest("req-1", "demo", "dev-1", 500, 1.0, "drift alert 7"))
    capture.on_message("edgekit/demo/dev-1/capture", message, True)
    capture.on_message("edgekit/demo/dev-1/capture", message, True)  # the retained message again (reconnect)
    assert offer(capture, 3, "a") == 3
    assert offer(capture, 4, "b") == 2  # 5 in all: max_requested, not 500
    assert offer(capture, 10) == 0
    status = capture.status()
    assert status["requests"]["honoured"] == 1 and status["requests"]["repeated"] == 1
    assert status["requests_honoured"] == 1 and status["requested_remaining"] == 0
    capture.stop()
    again = make(tmp_path, fraction=0.0, fleet_requests=True, max_requested=5)
    again.on_message("edgekit/demo/dev-1/capture", message, True)  # after a restart: still honoured once
    assert offer(again, 10) == 0


def test_requested_rows_still_to_come_survive_a_restart_and_stay_within_the_budget(tmp_path: Path) -> None:
    capture = make(tmp_path, fraction=0.0, fleet_requests=True, bytes_per_day=4 * ROW)
    assert capture.honour("req-2", 10)
    assert offer(capture, 3) == 3
    capture.stop()
    again = make(tmp_path, fraction=0.0, fleet_requests=True, bytes_per_day=4 * ROW)
    assert again.status()["requested_remaining"] == 7
    assert offer(again, 7) == 1  # the budget: 4 rows a day; the request's other rows are used up, skipped
    assert again.status()["requested_remaining"] == 0 and again.status()["skipped_budget"] == 6


def test_requests_are_ignored_without_fleet_requests(tmp_path: Path) -> None:
    capture = make(tmp_path, fraction=0.0, fleet_requests=False)
    capture.on_message("t", encode_capture_request(CaptureRequest("r", "demo", "dev-1", 50, 1.0, "")), True)
    assert offer(capture, 10) == 0
    assert capture.status()["requests"]["ignored"] == 1 and capture.status()["requests_honoured"] == 0


def good(**changes: object) -> bytes:
    doc = {"schema": "edgekit.capture_request/1", "request": "r-1", "fleet": "demo", "device": "dev-1",
           "samples": 5, "created": 1765000000.0, "reason": "x", **changes}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("payload", "kind"), [
    (b"\xff\xfe not json", "not_json"),
    (b"{", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"samples": NaN}', "not_json"),
    (good(schema="edgekit.capture_request/2"), "schema"),
    (good(device="dev-2"), "wrong_device"),
    (good(fleet="other"), "wrong_device"),
    (good(samples=10**30), "bad_samples"),
    (good(samples=0), "bad_samples"),
    (good(samples=100_001), "bad_samples"),
    (good(samples=5.0), "bad_samples"),
    (good(samples=True), "bad_samples"),
    (b'{"schema": "edgekit.capture_request/1", "request": "r", "fleet": "demo", "device": "dev-1", '
     b'"samples": ' + b"9" * 5000 + b"}", "not_json"),  # past Python's int digit limit
    (good(request="../../etc"), "bad_request_id"),
    (good(request=7), "bad_request_id"),
    (good(created=123).replace(b"123", b"1e400"), "bad_created"),  # a literal that parses to inf
    (good(created="yesterday"), "bad_created"),
    (good(reason=["x"]), "bad_reason"),
    (good(reason="x" * 10_000), "too_large"),
])
def test_hostile_requests_are_refused_with_a_kind(payload: bytes, kind: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_capture_request(payload, fleet="demo", device="dev-1")
    assert info.value.kind == kind


def test_hostile_messages_are_counted_and_ignored(tmp_path: Path) -> None:
    capture = make(tmp_path, fraction=0.0, fleet_requests=True)
    for payload in (b"garbage", good(device="dev-2"), good(samples=10**12), b""):
        capture.on_message("t", payload, True)
    assert offer(capture, 10) == 0
    requests = capture.status()["requests"]
    assert requests["invalid"] == {"not_json": 1, "wrong_device": 1, "bad_samples": 1}
    assert requests["received"] == 3 and requests["honoured"] == 0  # an empty payload is a cleared topic
    request = parse_capture_request(good(extra="ignored"), fleet="demo", device="dev-1")
    assert (request.request, request.samples) == ("r-1", 5)


def test_concurrent_predictions_lose_and_double_nothing_and_the_newest_state_is_kept(tmp_path: Path) -> None:
    """Four threads offering at once: every row kept is spooled once, and the budget on disk after a
    restart is what was captured (writes run outside the sampler's lock, so their order varies)."""
    capture = make(tmp_path, fraction=0.3, bytes_per_day=1 << 30)
    returned: list[int] = []

    def work(k: int) -> None:
        returned.append(sum(offer(capture, 5, f"t{k}-{i}") for i in range(150)))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = capture.status()
    assert status["captured"] == sum(returned) == status["pending_records"] > 0
    capture.stop()
    again = make(tmp_path, fraction=0.3, bytes_per_day=1 << 30)
    counters = again.store.counters()
    assert counters["budget_used"] == sum(returned) * ROW and counters["captured"] == sum(returned)
