"""The capture uploader against a small local HTTP server standing in for the fleet: what each answer does
(200, 400, 413, 401/403/507/5xx, no answer), that a batch whose answer never came is sent again with
the same record ids, the device's credential headers, label updates, and the backoff."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.capture.capture import Capture
from device_agent.capture.config import CaptureSettings
from device_agent.capture.store import CaptureStore
from device_agent.capture.uploader import Uploader
from tests.helpers.fleet_double import DROP, STORED_THEN_CRASH, FleetDouble

SHA = "cd" * 32
def capture_for(tmp_path: Path, fleet: FleetDouble, **uploader: Any) -> Capture:
    token = tmp_path / "upload.token"
    token.write_text("tok-123\n")
    settings = CaptureSettings(enabled=True, fraction=1.0, upload_url=fleet.url, token_file=token)
    store = CaptureStore(tmp_path / "captures.db", max_bytes=1 << 30)
    up = Uploader(store, url=fleet.url, device_id="dev-1", token_file=token, timeout=10.0,
                  **{"batch_records": 4, "interval": 0.05, **uploader})
    return Capture(settings, fleet="demo", device_id="dev-1", store=store, uploader=up, seed=0)


def predict(capture: Capture, n: int, request_id: str | None = None) -> int:
    x = np.arange(n * 64, dtype=np.float32).reshape(n, 1, 8, 8)
    out = np.tile(np.linspace(-1, 1, 10, dtype=np.float32), (n, 1))
    return capture.offer(x, out, out.argmax(1), request_id, 1000.0, SHA)


def test_200_deletes_the_whole_batch_and_counts_the_rejected(tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    assert predict(capture, 10, "req-1") == 10
    ids = capture.store.next_batch(100, 1 << 30).ids
    fleet.reject = {ids[1]}
    assert capture.uploader is not None and capture.uploader.upload_round()
    status = capture.status()
    assert (status["uploaded"], status["rejected"], status["pending_records"]) == (9, 1, 0)
    assert [len(b["records"]) for b in fleet.uploads()] == [4, 4, 2]  # batch_records
    assert set(fleet.stored) == set(ids) - {ids[1]}
    _, headers, body = fleet.requests[0]
    assert body["schema"] == "edgekit.captures/1" and body["device"] == "dev-1"
    assert headers["X-Edgekit-Device"] == "dev-1" and headers["Authorization"] == "Device tok-123"
    record = body["records"][0]
    assert set(record) == {"id", "created", "request_id", "row", "window_start", "model_sha256", "input",
                           "output", "predicted", "label"}
    assert (record["request_id"], record["row"], record["window_start"], record["model_sha256"]) == (
        "req-1", 0, 1000.0, SHA)
    assert record["input"]["dtype"] == "float32" and record["input"]["shape"] == [1, 8, 8]
    assert len(record["output"]) == 10 and record["predicted"] == 9 and record["label"] is None
    assert status["last_upload_error"] is None and status["last_upload"] is not None


def test_400_drops_the_batch_and_counts_it_rejected(tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    predict(capture, 6)
    fleet.script.append((400, {"error": "wrong schema"}))
    assert capture.uploader is not None
    capture.uploader.upload_round()
    status = capture.status()
    assert (status["rejected"], status["uploaded"], status["pending_records"]) == (4, 2, 0)


@pytest.mark.parametrize("answer", [(401, {"error": "bad token"}), (403, {"error": "other device"}),
                                    (507, {"error": "capture store full"}), (500, {"error": "boom"}),
                                    (503, {"error": "busy"}), (404, {"error": "no such route"}),
                                    (307, {"error": "go elsewhere"}), DROP])
def test_credential_full_store_server_errors_and_no_answer_keep_the_records(
        tmp_path: Path, fleet: FleetDouble, answer: Any) -> None:
    capture = capture_for(tmp_path, fleet)
    predict(capture, 6)
    sent_ids = capture.store.next_batch(4, 1 << 30).ids
    fleet.script.append(answer)
    assert capture.uploader is not None
    assert capture.uploader.upload_round() is False  # the round ends: back off
    status = capture.status()
    assert (status["pending_records"], status["uploaded"], status["rejected"]) == (6, 0, 0)
    assert status["last_upload_error"]
    assert len(fleet.uploads()) == 1
    # The fleet is back: the same records, the same ids, stored once.
    assert capture.uploader.upload_round()
    again = fleet.uploads()[1]
    assert [r["id"] for r in again["records"]] == sent_ids
    assert capture.status()["uploaded"] == 6 and capture.status()["last_upload_error"] is None


def test_a_fleet_that_stored_but_crashed_before_answering_gets_the_same_ids_and_keeps_one_copy(
        tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    predict(capture, 3)
    fleet.script.append(STORED_THEN_CRASH)
    assert capture.uploader is not None
    assert capture.uploader.upload_round() is False  # no answer: the records stay
    assert capture.status()["pending_records"] == 3 and len(fleet.stored) == 3
    assert capture.uploader.upload_round()
    first, replay = fleet.uploads()
    assert [r["id"] for r in replay["records"]] == [r["id"] for r in first["records"]]
    assert replay["records"] == first["records"]  # the same records, byte for byte
    assert len(fleet.stored) == 3  # stored once: the replay was all duplicates
    status = capture.status()
    assert (status["uploaded"], status["pending_records"], status["rejected"]) == (3, 0, 0)


def test_413_halves_the_batch_and_a_single_record_over_the_limit_is_dropped(
        tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    predict(capture, 4)
    fleet.script.extend([(413, {"error": "too large"}), (413, {"error": "too large"})])
    assert capture.uploader is not None and capture.uploader.upload_round()
    # 4 refused, 2 refused, then 1 taken, after which the batch size is the configured one again
    assert [len(b["records"]) for b in fleet.uploads()] == [4, 2, 1, 3] and capture.status()["uploaded"] == 4
    # one record alone over the limit: dropped, counted
    predict(capture, 1)
    fleet.script.append((413, {"error": "too large"}))
    capture.uploader._limit_bytes = 1  # as after halvings
    capture.uploader.upload_round()
    assert capture.status()["rejected"] == 1 and capture.status()["pending_records"] == 0


def test_a_label_after_upload_is_sent_as_a_label_update(tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    predict(capture, 3, "req-9")
    assert capture.uploader is not None and capture.uploader.upload_round()
    assert capture.label("req-9", ["7", "8", "9"]) == 3
    assert capture.status()["pending_labels"] == 3
    fleet.script.append((503, {"error": "busy"}))
    assert capture.uploader.upload_round() is False  # kept
    assert capture.uploader.upload_round()
    path, headers, body = fleet.requests[-1]
    assert path == "/api/captures/labels" and body["schema"] == "edgekit.capture_labels/1"
    assert headers["Authorization"] == "Device tok-123" and body["device"] == "dev-1"
    by_row = {record["row"]: fleet.labels[rid] for rid, record in fleet.stored.items()}
    assert by_row == {0: "7", 1: "8", 2: "9"}
    assert capture.status()["labels_sent"] == 3 and capture.status()["pending_labels"] == 0


def test_a_re_enrolled_token_is_read_at_the_next_round(tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    predict(capture, 1)
    (tmp_path / "upload.token").write_text("tok-new\n")
    assert capture.uploader is not None and capture.uploader.upload_round()
    assert fleet.requests[-1][1]["Authorization"] == "Device tok-new"


def test_backoff_doubles_to_five_minutes_and_a_success_returns_to_the_interval(tmp_path: Path) -> None:
    store = CaptureStore(tmp_path / "c.db", max_bytes=1 << 20)
    up = Uploader(store, url="http://127.0.0.1:9", device_id="d", interval=10.0)
    delays = [up.next_delay(False) for _ in range(8)]
    assert 15 <= delays[0] <= 25 and 30 <= delays[1] <= 50 and 60 <= delays[2] <= 100
    assert all(d <= 300 for d in delays) and delays[-1] >= 225
    assert up.next_delay(True) == 10.0 and up.failures == 0


def test_the_thread_uploads_on_its_own_and_stops(tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    capture.start()
    try:
        predict(capture, 5)
        deadline = time.monotonic() + 20
        while capture.status()["uploaded"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert capture.status()["uploaded"] == 5 and len(fleet.stored) == 5
    finally:
        capture.stop()
    assert capture.uploader is not None and capture.uploader._thread is not None
    assert not capture.uploader._thread.is_alive()
    assert capture.offer(np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 10), np.float32),
                         np.zeros(1, np.int64), None, 0.0, SHA) == 0  # stopped: nothing more is captured


def test_a_request_id_the_fleet_would_refuse_goes_as_null_and_labels_still_find_the_record(
        tmp_path: Path, fleet: FleetDouble) -> None:
    capture = capture_for(tmp_path, fleet)
    long_id, odd_id = "r" * 200, "tab\there"
    predict(capture, 1, long_id)
    predict(capture, 1, odd_id)
    predict(capture, 1, "x" * 128)
    capture.label(long_id, ["5"])
    assert capture.uploader is not None and capture.uploader.upload_round()
    sent = [(r["request_id"], r["label"]) for r in fleet.uploads()[0]["records"]]
    assert sent == [(None, "5"), (None, None), ("x" * 128, None)]
    capture.label(odd_id, ["6"])  # after the upload: a label update for the record sent with a null id
    assert capture.uploader.upload_round()
    assert list(fleet.labels.values()) == ["6"]
