"""Correlated windows: the agent's dispersion signal keeps alerts honest.

Streams are fresh Gaussian draws (the reference never saw them) made dependent in the two ways
devices are: each input repeated 2-4 times in a row, and an AR(1) process (consecutive inputs
alike). Marginals are exactly the reference's, so every alert here is a false alarm.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import build_reference
from device_agent.monitoring.summary import Histogrammer, WindowSummary
from device_agent.monitoring.summary_codec import CONTENT_TYPE_JSON
from edge_kit.fleet import dispersion_trailer as dispersion
from edge_kit.fleet import drift
from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ModelReference, ReferenceStore
from edge_kit.fleet.settings import DriftSettings, IngestSettings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import DigitsBundle, sample_images, summary

FEATURES = [f"f{i}" for i in range(5)]
LABELS = ["a", "b", "c"]
W = np.random.default_rng(0).normal(size=(5, 3))
MODEL = {"name": "toy", "version": "1", "sha256": "c" * 64}
ALPHA = 0.05
SETTINGS = DriftSettings(alpha=ALPHA, effect_wasserstein=0.0, effect_class_tvd=0.0, min_n=10, k=2, m=3)


class World:
    def __init__(self) -> None:
        self.plan = MonitorPlan.for_features(FEATURES, LABELS)
        x = np.random.default_rng(1).normal(size=(20000, 5))
        reference = build_reference(self.plan, self.plan.values(x, x @ W), 32)
        self.hist = Histogrammer(reference)
        self.ref = ModelReference.from_reference(reference, sha256=MODEL["sha256"], name="toy", version="1",
                                                 labels=LABELS)

    def window(self, x: np.ndarray) -> WindowSummary:
        """One window as the agent summarises it: chunks in arrival order."""
        s = WindowSummary.zero(self.hist, fleet="f", device="d", model=MODEL, window_start=0.0)
        for lo in range(0, len(x), 128):
            s.update(self.hist, self.plan.values(x[lo : lo + 128], x[lo : lo + 128] @ W))
        return s

    def arrays(self, summaries: list[WindowSummary]) -> tuple[np.ndarray, np.ndarray]:
        """(W, C, B) counts and (W, C) design effects, as the server reads them back from storage."""
        order = [summaries[0].channel_names.index(n) for n in self.ref.channel_names]
        flat = np.stack([s.counts[order].reshape(-1)[self.ref.flat_index] for s in summaries])
        disp = np.stack([s.dispersion_statistic()[order] for s in summaries])  # type: ignore[index]
        return self.ref.unflatten(flat), dispersion.window_phi(disp)


def repeated(rng: np.random.Generator, n: int) -> np.ndarray:
    """Each fresh input repeated 2, 3 or 4 times in a row."""
    times = rng.integers(2, 5, n)
    return np.repeat(rng.normal(size=(n, 5)), times, axis=0)[:n]


def ar1(rng: np.random.Generator, n: int, rho: float = 0.8) -> np.ndarray:
    """A stationary AR(1) stream with N(0, 1) marginals."""
    e = rng.normal(size=(n, 5))
    x = np.empty_like(e)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = rho * x[t - 1] + np.sqrt(1 - rho * rho) * e[t]
    return x


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def test_the_agent_signal_is_near_one_for_independent_draws_and_tracks_repeats(world: World) -> None:
    rng = np.random.default_rng(2)
    for n in (200, 1000):
        iid = world.window(rng.normal(size=(n, 5))).dispersion_statistic()
        assert iid is not None
        ratio = iid[:, 0].sum() / iid[:, 1].sum()
        assert 0.85 <= ratio <= 1.15, f"iid n={n}: X/df = {ratio:.2f}"
        three = world.window(np.repeat(rng.normal(size=(n // 3 + 1, 5)), 3, axis=0)[:n]).dispersion_statistic()
        assert three is not None
        ratio = three[:, 0].sum() / three[:, 1].sum()
        assert 2.3 <= ratio <= 3.5, f"each input 3 times, n={n}: X/df = {ratio:.2f}"


def _alert_rates(world: World, stream, n: int, devices: int, seed: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    summaries = []
    for _ in range(devices):  # one continuous stream per device, cut into m consecutive windows
        x = stream(rng, n * SETTINGS.m)
        summaries += [world.window(x[i * n : (i + 1) * n]) for i in range(SETTINGS.m)]
    counts, phi = world.arrays(summaries)
    out = {}
    for name, d in (("corrected", phi), ("independent", None)):
        r = drift.test_windows(world.ref, counts, SETTINGS, dispersion=d)
        flags = ((r.p_adjusted <= ALPHA) & r.effect_ok).any(axis=1).reshape(devices, SETTINGS.m)
        out[f"{name}_window"] = float(flags.mean())
        out[f"{name}_alert"] = float(np.mean([drift.k_of_m(list(f), SETTINGS.k, SETTINGS.m) for f in flags]))
    return out


@pytest.mark.parametrize("stream,n,devices", [
    (repeated, 200, 100),
    pytest.param(repeated, 500, 200, marks=pytest.mark.slow),
    pytest.param(ar1, 500, 200, marks=pytest.mark.slow),
    pytest.param(ar1, 200, 200, marks=pytest.mark.slow),
])
def test_correlated_windows_keep_the_alert_level_false_alarm_rate_at_most_alpha(
        world: World, stream, n: int, devices: int) -> None:  # type: ignore[no-untyped-def]
    rates = _alert_rates(world, stream, n, devices=devices, seed=n)
    assert rates["corrected_alert"] <= ALPHA, rates
    # Treated as independent draws, the same windows alert far more often than alpha (the bug).
    assert rates["independent_alert"] > 2 * ALPHA, rates


def test_independent_windows_lose_little_to_the_correction(world: World) -> None:
    """On i.i.d. streams the estimated design effect is ~1: a half-sd shift is still caught."""
    rng = np.random.default_rng(9)
    summaries = []
    for _ in range(40):
        x = rng.normal(size=(200, 5))
        x[:, 0] += 0.5
        summaries.append(world.window(x))
    counts, phi = world.arrays(summaries)
    assert float(np.median(phi)) <= 1.15
    r = drift.test_windows(world.ref, counts, SETTINGS, dispersion=phi)
    assert ((r.p_adjusted <= ALPHA) & r.effect_ok).any(axis=1).mean() >= 0.9


def _ingestor(tmp_path: Path, bundle: DigitsBundle) -> Ingestor:
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    return Ingestor(storage, ReferenceStore([bundle.path]), IngestSettings(max_payload_bytes=64 * 1024))


def test_the_signal_is_stored_with_the_window_and_old_payloads_still_ingest(tmp_path: Path,
                                                                           digits_bundle: DigitsBundle) -> None:
    ing = _ingestor(tmp_path, digits_bundle)
    ref = ReferenceStore([digits_bundle.path]).get(digits_bundle.sha256)
    assert ref is not None
    rng = np.random.default_rng(4)
    now = time.time()
    new = summary(digits_bundle, "dev1", now - 600, np.repeat(sample_images(100, rng)[0], 3, axis=0))
    sent = new.dispersion_statistic()
    assert sent is not None
    old = summary(digits_bundle, "dev2", now - 600, sample_images(300, rng)[0]).to_payload()
    for channel in old["channels"].values():  # what an agent from before the signal sends
        del channel["disp"]
    ing.receive("edgekit/test/dev1/summary", *new.to_bytes())
    ing.receive("edgekit/test/dev2/summary", json.dumps(old).encode(), CONTENT_TYPE_JSON)
    ing.flush()
    assert ing.storage.window_count() == 2
    devices, _, flat, stored = drift._arrays(ref, ing.storage.windows(ref.sha256, 0))
    assert stored is not None and devices.tolist() == ["dev1", "dev2"]
    order = [new.channel_names.index(n) for n in ref.channel_names]
    np.testing.assert_allclose(stored[0], sent[order], rtol=1e-4)
    assert np.isnan(stored[1]).all()  # no signal: tested as independent draws
    phi = dispersion.window_phi(stored)
    assert phi[0].max() > 2.0 and (phi[1] == 1.0).all()
    # Counts read back exactly, trailer or not; both windows are evaluated.
    assert (flat.sum(axis=1) == 300 * len(ref.channel_names)).all()
    ev = drift.evaluate_model(ing.storage, ref, DriftSettings(), now)
    assert ev.tested_device_windows == 2


def test_a_digits_window_with_the_signal_stays_within_4_kb(digits_bundle: DigitsBundle) -> None:
    rng = np.random.default_rng(5)
    for n in (50, 1000, 20000):
        s = summary(digits_bundle, "dev1", 1.8e9, sample_images(n, rng, noise=0.05)[0])
        data, _ = s.to_bytes(compress=True)
        assert s.dispersion_statistic() is not None
        assert len(data) <= 4096, f"n={n}: {len(data)} bytes"


@pytest.mark.slow
def test_inputs_repeating_in_random_order_are_not_drift_once_the_agent_counts_repeats(
        tmp_path: Path, digits_bundle: DigitsBundle) -> None:
    """A fixed set of 300 inputs replayed with replacement (a fixed camera, a replayed test set): nothing shifted,
    but the block signal cannot see repeats that do not arrive together. The agent's n_eff can."""
    ing = _ingestor(tmp_path, digits_bundle)
    ref = ReferenceStore([digits_bundle.path]).get(digits_bundle.sha256)
    assert ref is not None
    rng = np.random.default_rng(8)
    fixed, _ = sample_images(300, rng)
    now = time.time()
    for w in range(24):
        x = fixed[rng.integers(0, 300, 500)]
        s = summary(digits_bundle, "dev1", now - 3000 + 60 * w, x)
        s.count_inputs(x.astype(np.float32))
        payload = s.to_payload()
        assert payload["n_eff"] < 250
        ing.receive("edgekit/test/dev1/summary", json.dumps(payload).encode(), CONTENT_TYPE_JSON)
        del payload["n_eff"]  # the same window from an agent that does not count repeats
        payload["device"] = "dev2"
        ing.receive("edgekit/test/dev2/summary", json.dumps(payload).encode(), CONTENT_TYPE_JSON)
    ing.flush()
    devices, _, flat, stored = drift._arrays(ref, ing.storage.windows(ref.sha256, 0))
    assert stored is not None and stored.shape[-1] == 5
    phi = drift.window_design_effect(stored, len(devices), len(ref.channel_names), SETTINGS)
    r = drift.test_windows(ref, ref.unflatten(flat), SETTINGS, dispersion=phi)
    flagged = (r.p_adjusted <= ALPHA).any(axis=1)
    counted, blind = flagged[devices == "dev1"].mean(), flagged[devices == "dev2"].mean()
    assert phi[devices == "dev1"].min() > 1.8
    assert counted <= 0.15 < blind, (counted, blind)
