"""Payload validation against the model's reference, dedup, counters (no broker: the Ingestor directly)."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from device_agent.monitoring.summary_codec import CONTENT_TYPE_JSON, CONTENT_TYPE_ZLIB
from edge_kit.fleet.dispersion_trailer import strip
from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.settings import IngestSettings
from edge_kit.fleet.storage import Storage, decode_counts, encode_counts
from harness.fleetkit import DigitsBundle, sample_images, summary

TOPIC = "edgekit/test/dev1/summary"


@pytest.fixture
def ingestor(tmp_path: Path, digits_bundle: DigitsBundle) -> Ingestor:
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    return Ingestor(storage, ReferenceStore([digits_bundle.path]), IngestSettings(max_payload_bytes=64 * 1024))


def _payload(bundle: DigitsBundle, device: str = "dev1", start: float | None = None) -> dict:
    x, _ = sample_images(50, np.random.default_rng(0))
    return summary(bundle, device, time.time() - 120 if start is None else start, x).to_payload()


def _send(ing: Ingestor, payload: object, topic: str = TOPIC) -> None:
    ing.receive(topic, json.dumps(payload).encode(), CONTENT_TYPE_JSON)


def test_accepts_valid_summaries_and_drops_qos1_duplicates(ingestor: Ingestor, digits_bundle: DigitsBundle) -> None:
    s = summary(digits_bundle, "dev1", time.time() - 120, sample_images(80, np.random.default_rng(1))[0])
    data, ctype = s.to_bytes()
    for _ in range(3):  # the same window delivered three times (QoS 1 redelivery)
        ingestor.receive(TOPIC, data, ctype, mid=1, qos=1)
    other = summary(digits_bundle, "dev1", time.time() - 60, sample_images(80, np.random.default_rng(2))[0])
    ingestor.receive(TOPIC, *other.to_bytes())
    acked = ingestor.flush()
    assert len(acked) == 4
    assert ingestor.storage.window_count() == 2
    c = ingestor.storage.counters()
    assert c["accepted"] == 2 and c["duplicate"] == 2
    # And across batches (another process, a restart): still dropped by the key.
    ingestor.receive(TOPIC, data, ctype)
    ingestor.flush()
    assert ingestor.storage.window_count() == 2 and ingestor.storage.counters()["duplicate"] == 3
    stored = ingestor.storage.windows(digits_bundle.sha256, 0)
    total_bins = sum(c.bins for c in digits_bundle.reference.channels.values())
    flat = decode_counts([bytes(stored[0][4])], total_bins)[0]
    assert flat.sum() == 80 * len(digits_bundle.plan.channel_names)  # every channel's counts add to n
    # Small counts are stored as uint16 (then the agent's dispersion trailer: edge_kit/fleet/dispersion_trailer.py).
    assert len(strip(bytes(stored[0][4]), total_bins)) == 2 * total_bins
    dev = ingestor.storage.devices()[0]
    assert dev["device"] == "dev1" and dev["state"] == "online" and dev["model_version"] == "1.0.0"


def _mutations(bundle: DigitsBundle) -> dict[str, tuple[str, bytes | object, str]]:
    """kind expected -> (topic, payload or raw bytes, content type)."""
    good = _payload(bundle)
    out: dict[str, tuple[str, bytes | object, str]] = {}
    out["malformed_json"] = (TOPIC, b"{not json", CONTENT_TYPE_JSON)
    out["bad_encoding"] = (TOPIC, b"not zlib at all", CONTENT_TYPE_ZLIB)
    p = json.loads(json.dumps(good))
    p["schema"] = "edgekit.summary/0"
    out["schema"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["channels"]["in.mean"]["counts"] = p["channels"]["in.mean"]["counts"][:-1]
    out["counts"] = (TOPIC, p, CONTENT_TYPE_JSON)  # wrong length also breaks sum == n; see the bins case below
    p = json.loads(json.dumps(good))
    counts = p["channels"]["in.mean"]["counts"]
    counts[0] += counts[-1]
    p["channels"]["in.mean"]["counts"] = counts[:-1]  # wrong length, right sum
    out["bins"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["channels"]["in.std"]["counts"][0] = -1
    out["negative"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    big = 10**13
    for ch in p["channels"].values():
        ch["counts"] = [big] + [0] * (len(ch["counts"]) - 1)
    p["n"] = big
    out["gigantic"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    for ch in p["channels"].values():
        ch["counts"] = [10**30] + [0] * (len(ch["counts"]) - 1)
    p["n"] = 10**30
    out["beyond_int64"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["channels"]["in.mean"]["max"] = None  # min without max
    out["half_null_stats"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["channels"]["in.mean"]["sum"] = float("nan")
    out["nan_stat"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["window"]["start"], p["window"]["end"] = time.time() + 3600, time.time() + 3660
    out["future_window"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["window"]["start"] = 1000.0
    out["window"] = (TOPIC, p, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["model"]["sha256"] = "0" * 64
    out["unknown_model"] = (TOPIC, p, CONTENT_TYPE_JSON)
    out["topic_mismatch"] = ("edgekit/test/dev2/summary", good, CONTENT_TYPE_JSON)
    p = json.loads(json.dumps(good))
    p["channels"]["in.extra"] = p["channels"].pop("in.mean")
    out["channels"] = (TOPIC, p, CONTENT_TYPE_JSON)
    out["too_large"] = (TOPIC, b"{" + b" " * 70_000 + b"}", CONTENT_TYPE_JSON)
    bomb = zlib.compress(b" " * (8 * 1024 * 1024))  # small on the wire, 8 MiB inflated
    out["zlib_bomb"] = (TOPIC, bomb, CONTENT_TYPE_ZLIB)
    return out


EXPECTED_KIND = {"negative": "counts", "gigantic": "counts", "zlib_bomb": "too_large", "beyond_int64": "malformed",
                 "half_null_stats": "malformed", "nan_stat": "malformed"}


def test_bad_payloads_are_rejected_counted_and_stored_data_kept(ingestor: Ingestor, digits_bundle: DigitsBundle,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    _send(ingestor, _payload(digits_bundle))
    ingestor.flush()
    cases = _mutations(digits_bundle)
    for topic, payload, ctype in cases.values():
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        ingestor.receive(topic, data, ctype)
        ingestor.receive(topic, data, ctype)  # twice: logged once per kind
    acked = ingestor.flush()
    assert len(acked) == 2 * len(cases)  # rejected messages are acknowledged too (redelivery cannot fix them)
    counters = ingestor.storage.counters()
    for case in cases:
        kind = EXPECTED_KIND.get(case, case)
        assert counters.get(f"rejected:{kind}", 0) >= 2, (case, counters)
    assert ingestor.storage.window_count() == 1
    assert counters["accepted"] == 1
    # Logged once per kind, not once per message.
    logged = [r.getMessage() for r in caplog.records if "rejected a message" in r.getMessage()]
    assert len(logged) == len({EXPECTED_KIND.get(c, c) for c in cases})


def test_labels_in_summary_are_stored(ingestor: Ingestor, digits_bundle: DigitsBundle) -> None:
    x, y = sample_images(60, np.random.default_rng(3))
    s = summary(digits_bundle, "dev1", time.time() - 100, x, y=y)
    ingestor.receive(TOPIC, *s.to_bytes())
    ingestor.flush()
    labels = ingestor.storage.labels(digits_bundle.sha256, 0)
    assert len(labels) == 1
    assert np.frombuffer(labels[0][1], dtype=np.int64).sum() == 60


def test_status_messages_update_devices(ingestor: Ingestor) -> None:
    ingestor.receive("edgekit/test/dev9/status", b'{"state": "offline", "reason": "last will"}', None)
    ingestor.receive("edgekit/test/dev8/status", b'{"state": "sleeping"}', None)
    ingestor.flush()
    devices = {d["device"]: d for d in ingestor.storage.devices()}
    assert devices["dev9"]["state"] == "offline" and devices["dev9"]["status"]["reason"] == "last will"
    assert "dev8" not in devices and ingestor.storage.counters()["rejected:status"] == 1


def test_counts_encoding_round_trips_every_width() -> None:
    for top in (0, 65535, 65536, 2**32 - 1, 2**32, 10**12):
        flat = np.array([top, 1, 0, 7], dtype=np.int64)
        blob = encode_counts(flat)
        assert decode_counts([blob, encode_counts(np.array([1, 2, 3, 4]))], 4).tolist() == [flat.tolist(), [1, 2, 3, 4]]
    with pytest.raises(ValueError):
        decode_counts([b"12345"], 4)


def test_summary_round_trip_through_the_bulk_decoder(digits_bundle: DigitsBundle) -> None:
    """The server-side fast paths in device_agent.monitoring.summary_validation decode exactly what was encoded."""
    from device_agent.monitoring.summary import WindowSummary

    x, y = sample_images(75, np.random.default_rng(8))
    s = summary(digits_bundle, "dev1", 1.8e9, x, y=y)
    back = WindowSummary.from_bytes(*s.to_bytes())
    assert back.to_payload() == s.to_payload()
    np.testing.assert_array_equal(back.counts, s.counts)
    np.testing.assert_array_equal(back.bins, s.bins)
    empty = WindowSummary.zero(digits_bundle.histogrammer, fleet="f", device="d", model=digits_bundle.model,
                               window_start=1.8e9)
    again = WindowSummary.from_bytes(*empty.to_bytes())
    assert again.n == 0 and np.isinf(again.minimum).all() and again.to_payload() == empty.to_payload()


def test_latest_windows_reads_only_what_the_device_test_needs(ingestor: Ingestor, digits_bundle: DigitsBundle) -> None:
    rng = np.random.default_rng(9)
    now = time.time()
    for i in range(6):
        n = 30 if i == 5 else 120  # the newest window is too small to test
        s = summary(digits_bundle, "dev1", now - 1000 + 100 * i, sample_images(n, rng)[0])
        ingestor.receive(TOPIC, *s.to_bytes())
    ingestor.flush()
    rows = ingestor.storage.latest_windows(digits_bundle.sha256, 0, per_device=3, min_n=100)
    assert [round(r[1] - now) for r in rows] == [-800, -700, -600]
    assert ingestor.storage.small_window_count(digits_bundle.sha256, 0, 100) == 1


def test_an_unexpected_error_rejects_the_message_instead_of_crashing(ingestor: Ingestor, digits_bundle: DigitsBundle,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ingestor.validator, "summary", broken)
    _send(ingestor, _payload(digits_bundle))
    assert len(ingestor.flush()) == 1  # acknowledged: redelivering it would only hit the bug again
    assert ingestor.storage.counters()["rejected:internal_error"] == 1
