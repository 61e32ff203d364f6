"""Summary payload v1 (docs/architecture.md section 6): the golden file still decodes, and summaries merge by adding."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import PayloadError
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import build_reference
from device_agent.monitoring.summary import Histogrammer, WindowSummary
from device_agent.monitoring.summary_codec import CONTENT_TYPE_JSON, CONTENT_TYPE_ZLIB

GOLDEN = Path(__file__).parent / "data" / "summary_v1.json"
MODEL = {"name": "m", "version": "1", "sha256": "ab" * 32}


def test_the_v1_golden_payload_decodes_to_the_recorded_values() -> None:
    payload = json.loads(GOLDEN.read_text())
    s = WindowSummary.from_bytes(GOLDEN.read_bytes(), CONTENT_TYPE_JSON)
    assert (s.fleet, s.device, s.seq, s.n) == ("plant-a", "cam-7", 41, 5)
    assert (s.window_start, s.window_end) == (1767225600.0, 1767225660.0)
    assert s.channel_names == ["in.mean", "out.confidence", "out.pred"]
    assert s.channel_counts("out.pred").tolist() == [2, 0, 3]
    assert s.confusion is not None and s.confusion.tolist() == [[2, 0, 0], [0, 0, 1], [0, 0, 1]]
    # Re-encoding gives back the same document: the format did not drift.
    assert s.to_payload() == payload
    data, content_type = s.to_bytes(compress=True)
    assert content_type == CONTENT_TYPE_ZLIB
    assert json.loads(zlib.decompress(data)) == payload


def _setup(seed: int = 0) -> tuple[MonitorPlan, Histogrammer, np.random.Generator]:
    plan = MonitorPlan.for_features(["a", "b", "c"], ["x", "y"])
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(400, 3))
    logits = rng.normal(size=(400, 2))
    return plan, Histogrammer(build_reference(plan, plan.values(train, logits), bins=8)), rng


def _summary(h: Histogrammer, start: float, seq: int = 0) -> WindowSummary:
    return WindowSummary.zero(h, fleet="f", device="d", model=MODEL, window_start=start, seq=seq,
                              label_names=["x", "y"])


def test_merge_equals_one_update_over_both_batches() -> None:
    plan, h, rng = _setup()
    a_vals = plan.values(rng.normal(size=(37, 3)), rng.normal(size=(37, 2)))
    b_vals = plan.values(rng.normal(2.0, size=(11, 3)), rng.normal(size=(11, 2)))
    a, b, both = _summary(h, 0.0), _summary(h, 60.0, 1), _summary(h, 0.0)
    a.update(h, a_vals)
    b.update(h, b_vals)
    both.update(h, np.concatenate([a_vals, b_vals]))
    merged = a.merge(b)
    assert merged.n == 48 == both.n
    np.testing.assert_array_equal(merged.counts, both.counts)
    np.testing.assert_allclose(merged.total, both.total)
    np.testing.assert_allclose(merged.total_sq, both.total_sq)
    np.testing.assert_array_equal(merged.minimum, both.minimum)
    np.testing.assert_array_equal(merged.maximum, both.maximum)
    assert (merged.window_start, merged.window_end) == (0.0, 60.0)
    # Every channel's counts add up to n, and zero is the identity of merge.
    assert (merged.counts.sum(axis=1) == 48).all()
    same = merged.merge(_summary(h, 0.0))
    np.testing.assert_array_equal(same.counts, merged.counts)
    assert same.n == merged.n


def test_update_in_chunks_equals_update_at_once() -> None:
    plan, h, rng = _setup(1)
    values = plan.values(rng.normal(size=(100, 3)), rng.normal(size=(100, 2)))
    once, chunked = _summary(h, 0.0), _summary(h, 0.0)
    once.update(h, values)
    for i in range(0, 100, 7):
        chunked.update(h, values[i : i + 7])
    np.testing.assert_array_equal(once.counts, chunked.counts)
    np.testing.assert_allclose(once.total, chunked.total)


def test_confusion_counts_merge_and_roundtrip() -> None:
    _, h, _ = _setup()
    a, b = _summary(h, 0.0), _summary(h, 1.0)
    a.update_labels(np.array([0, 1, 1]), np.array([0, 1, 0]))
    b.update_labels(np.array([1]), np.array([1]))
    merged = a.merge(b)
    assert merged.confusion is not None and merged.confusion.tolist() == [[1, 0], [1, 2]]
    decoded = WindowSummary.from_bytes(*merged.to_bytes(compress=True))
    assert decoded.confusion is not None and decoded.confusion.tolist() == [[1, 0], [1, 2]]
    with pytest.raises(ValueError):
        a.update_labels(np.array([2]), np.array([0]))


@pytest.mark.parametrize(
    ("mutate", "kind"),
    [
        (lambda p: p.update(schema="edgekit.summary/0"), "schema"),
        (lambda p: p.update(n=6), "counts"),
        (lambda p: p["channels"]["in.mean"].update(counts=[1, -3, 1]), "counts"),
        (lambda p: p["window"].update(end=0.0), "window"),
        (lambda p: p.pop("device"), "malformed"),
        (lambda p: p["labels"].update(confusion=[[1, 2], [3, 4]]), "counts"),
        (lambda p: p["channels"]["in.mean"].update(disp=[1.0, -1, 0.5, 3]), "malformed"),
        (lambda p: p["channels"]["in.mean"].update(disp=[1.0, 2]), "malformed"),
    ],
)
def test_bad_payloads_are_refused_with_a_kind(mutate, kind: str) -> None:
    payload = json.loads(GOLDEN.read_text())
    mutate(payload)
    with pytest.raises(PayloadError) as err:
        WindowSummary.from_bytes(json.dumps(payload).encode(), CONTENT_TYPE_JSON)
    assert err.value.kind == kind


def test_zlib_bombs_and_bad_encodings_are_refused() -> None:
    bomb = zlib.compress(b"[" + b"0," * 3_000_000 + b"0]")
    with pytest.raises(PayloadError) as err:
        WindowSummary.from_bytes(bomb, CONTENT_TYPE_ZLIB)
    assert err.value.kind == "too_large"
    with pytest.raises(PayloadError) as err:
        WindowSummary.from_bytes(b"not zlib", CONTENT_TYPE_ZLIB)
    assert err.value.kind == "bad_encoding"


def test_dispersion_signal_roundtrips_adds_on_merge_and_is_absent_from_v1_payloads() -> None:
    plan, h, rng = _setup(2)
    a, b = _summary(h, 0.0), _summary(h, 60.0, 1)
    a.update(h, plan.values(rng.normal(size=(120, 3)), rng.normal(size=(120, 2))))
    b.update(h, plan.values(rng.normal(size=(90, 3)), rng.normal(size=(90, 2))))
    da, db = a.dispersion_statistic(), b.dispersion_statistic()
    assert da is not None and db is not None and da.shape == (len(h.names), 4)
    merged = a.merge(b)
    np.testing.assert_allclose(merged.dispersion_statistic(), da + db)
    decoded = WindowSummary.from_bytes(*merged.to_bytes(compress=True))
    np.testing.assert_allclose(decoded.dispersion_statistic(), da + db, rtol=1e-4)
    golden = WindowSummary.from_bytes(GOLDEN.read_bytes(), CONTENT_TYPE_JSON)
    assert golden.dispersion_statistic() is None
    # A merge with a window that has no signal has none: it would describe only part of the data.
    assert golden.merge(golden).dispersion_statistic() is None
