"""Exact repeats of inputs in a window: the agent's effective sample size, and how the payload carries it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_agent.errors import PayloadError
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import build_reference
from device_agent.monitoring.repeats import RepeatCounter
from device_agent.monitoring.summary import Histogrammer, WindowSummary
from device_agent.monitoring.summary_codec import CONTENT_TYPE_JSON
from device_agent.monitoring.window import WindowMonitor

MODEL = {"name": "m", "version": "1", "sha256": "ab" * 32}


def _kish(multiplicities: np.ndarray) -> float:
    n = multiplicities.sum()
    return float(n * n / np.square(multiplicities).sum())


def test_effective_n_is_kish_over_identical_rows_in_any_order() -> None:
    rng = np.random.default_rng(0)
    fixed = rng.random((300, 64)).astype(np.float32)
    drawn = rng.integers(0, 300, 500)
    counter = RepeatCounter()
    for lo in range(0, 500, 64):  # chunks, as the agent hands them over
        counter.add(fixed[drawn[lo : lo + 64]])
    assert counter.rows == 500
    assert counter.effective_n() == pytest.approx(_kish(np.bincount(drawn)))
    assert 150 < counter.effective_n() < 230  # ~ 1 / (1/500 + 1/300): the fixed set is the limit


def test_distinct_rows_give_n_and_near_identical_rows_are_distinct() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((1000, 8, 8)).astype(np.float32)
    x[1] = x[0]
    x[1, 3, 3] = np.nextafter(x[0, 3, 3], 2.0)  # one ulp apart: a different input
    counter = RepeatCounter()
    counter.add(x)
    assert counter.effective_n() == 1000.0


def test_memory_stays_bounded_and_the_estimate_close() -> None:
    rng = np.random.default_rng(2)
    fixed = rng.random((5000, 16)).astype(np.float32)
    drawn = rng.integers(0, 5000, 40000)
    counter = RepeatCounter(max_hashes=4000)
    for lo in range(0, len(drawn), 1000):
        counter.add(fixed[drawn[lo : lo + 1000]])
    assert counter.level > 0 and sum(len(k) for k in counter._kept) <= 4000
    assert counter.effective_n() == pytest.approx(_kish(np.bincount(drawn)), rel=0.15)


def _setup() -> tuple[MonitorPlan, Histogrammer]:
    plan = MonitorPlan.for_features(["a", "b", "c"], ["x", "y"])
    rng = np.random.default_rng(3)
    train = rng.normal(size=(400, 3))
    return plan, Histogrammer(build_reference(plan, plan.values(train, rng.normal(size=(400, 2))), bins=8))


def test_the_monitor_sends_n_eff_and_the_payload_round_trips() -> None:
    plan, hist = _setup()
    monitor = WindowMonitor(plan, hist, fleet="f", device="d", model=MODEL, window_start=0.0, chunk=32,
                            background=False)
    rng = np.random.default_rng(4)
    fixed = rng.normal(size=(50, 3)).astype(np.float32)
    for _ in range(10):
        x = fixed[rng.integers(0, 50, 20)]
        out = rng.normal(size=(20, 2)).astype(np.float32)
        monitor.record(x, out, out.argmax(axis=1), None)
    closed = monitor.close(60.0)
    payload = closed.to_payload()
    assert closed.n == 200 and 0 < payload["n_eff"] < 100  # 200 draws from 50 inputs
    back = WindowSummary.from_bytes(*closed.to_bytes())
    assert back.effective_n() == payload["n_eff"] and back.to_payload() == payload


def test_a_summary_that_did_not_see_every_input_sends_no_n_eff() -> None:
    plan, hist = _setup()
    s = WindowSummary.zero(hist, fleet="f", device="d", model=MODEL, window_start=0.0)
    s.update(hist, plan.values(np.zeros((5, 3)), np.zeros((5, 2))))
    assert "n_eff" not in s.to_payload()


def test_merged_windows_add_their_squared_multiplicities() -> None:
    plan, hist = _setup()
    a, b = (WindowSummary.zero(hist, fleet="f", device="d", model=MODEL, window_start=0.0) for _ in range(2))
    for s, copies in ((a, 1), (b, 4)):
        x = np.repeat(np.arange(30, dtype=np.float32).reshape(10, 3), copies, axis=0)
        s.update(hist, plan.values(x, np.zeros((len(x), 2))))
        s.count_inputs(x)
    assert (a.effective_n(), b.effective_n()) == (10.0, 10.0)
    assert a.merge(b).effective_n() == pytest.approx(50 * 50 / (10 + 10 * 16))


@pytest.mark.parametrize("n_eff", [501, -1, True, "400", float("nan"), 1e400])
def test_the_decoder_refuses_an_n_eff_a_device_cannot_have(n_eff: object) -> None:
    plan, hist = _setup()
    s = WindowSummary.zero(hist, fleet="f", device="d", model=MODEL, window_start=0.0)
    s.update(hist, plan.values(np.zeros((500, 3)), np.zeros((500, 2))))
    payload = s.to_payload()
    payload["n_eff"] = n_eff
    with pytest.raises(PayloadError) as err:
        WindowSummary.from_bytes(json.dumps(payload).encode(), CONTENT_TYPE_JSON)
    assert err.value.kind in ("counts", "malformed_json")
    payload["n_eff"] = 500  # exactly n: independent draws
    assert WindowSummary.from_bytes(json.dumps(payload).encode(), CONTENT_TYPE_JSON).n_eff == 500.0
