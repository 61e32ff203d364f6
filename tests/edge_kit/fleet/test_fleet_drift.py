"""Drift decisions: false alarms under no drift, detection of injected shifts, the alert rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import build_reference
from device_agent.monitoring.summary import Histogrammer
from edge_kit.fleet import drift
from edge_kit.fleet.reference_index import ModelReference
from edge_kit.fleet.settings import DriftSettings

FEATURES = [f"f{i}" for i in range(5)]
LABELS = ["a", "b", "c"]
W = np.random.default_rng(0).normal(size=(5, 3))


class World:
    """Five Gaussian features, a fixed linear 3-class model, a reference over 20,000 samples."""

    def __init__(self, bins: int = 32) -> None:
        self.plan = MonitorPlan.for_features(FEATURES, LABELS)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(20000, 5))
        reference = build_reference(self.plan, self.plan.values(x, x @ W), bins)
        self.hist = Histogrammer(reference)
        self.ref = ModelReference.from_reference(reference, sha256="f" * 64, name="toy", version="1",
                                                 labels=LABELS)

    def counts(self, rng: np.random.Generator, n: int, shift: float = 0.0, scale: float = 1.0,
               feature: int = 0) -> np.ndarray:
        x = rng.normal(size=(n, 5))
        x[:, feature] = x[:, feature] * scale + shift
        c = self.hist.counts(self.plan.values(x, x @ W))
        return c.reshape(-1)[self.ref.flat_index]  # the stored (flat) layout


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _flags(world: World, flat: np.ndarray, settings: DriftSettings) -> tuple[np.ndarray, drift.ChannelResults]:
    r = drift.test_windows(world.ref, world.ref.unflatten(flat), settings)
    return ((r.p_adjusted <= settings.alpha) & r.effect_ok), r


@pytest.mark.parametrize("n", [100, 1000])
def test_false_alarm_rate_under_no_drift_is_at_most_alpha(world: World, n: int) -> None:
    # No practical threshold: this measures the statistical error rate alone.
    settings = DriftSettings(alpha=0.05, effect_wasserstein=0.0, effect_class_tvd=0.0, min_n=10)
    rng = np.random.default_rng(n)
    windows = np.stack([world.counts(rng, n) for _ in range(600)])
    flagged, _ = _flags(world, windows, settings)
    rate = flagged.any(axis=1).mean()
    assert rate <= settings.alpha, f"false alarm rate {rate:.3f} over 600 windows"


def test_detects_a_half_sd_shift_in_one_input(world: World) -> None:
    settings = DriftSettings()
    rng = np.random.default_rng(7)
    flagged, r = _flags(world, np.stack([world.counts(rng, 500, shift=0.5) for _ in range(20)]), settings)
    c = world.ref.channel_names.index("in.f0")
    assert flagged[:, c].all()
    assert r.effect[:, c].mean() == pytest.approx(0.5, abs=0.1)  # Wasserstein in reference sd units
    # The untouched inputs stay quiet.
    quiet = [world.ref.channel_names.index(f"in.f{i}") for i in range(1, 5)]
    assert not flagged[:, quiet].any()


def test_spread_change_is_caught_by_chi_square_where_ks_is_weak(world: World) -> None:
    settings = DriftSettings()
    rng = np.random.default_rng(8)
    flagged, r = _flags(world, np.stack([world.counts(rng, 1000, scale=1.5, feature=1) for _ in range(10)]),
                        settings)
    c = world.ref.channel_names.index("in.f1")
    assert flagged[:, c].all()
    assert (r.chi2_p[:, c] < r.ks_p[:, c]).all()


def test_tiny_shift_with_huge_n_is_significant_but_not_practically_relevant(world: World) -> None:
    settings = DriftSettings()
    rng = np.random.default_rng(9)
    flagged, r = _flags(world, world.counts(rng, 400_000, shift=0.03)[None, :], settings)
    c = world.ref.channel_names.index("in.f0")
    assert r.p_adjusted[0, c] < settings.alpha  # a real, tiny difference ...
    assert not flagged[0, c]  # ... that does not raise an alarm: effect < 0.1 sd


def _fleet(world: World, rng: np.random.Generator, drifting: dict[str, list[float]], devices: int = 60,
           n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    names, starts, flats = [], [], []
    for w in range(3):
        for d in range(devices):
            name = f"dev{d:03d}"
            shift = drifting.get(name, [0.0, 0.0, 0.0])[w]
            names.append(name)
            starts.append(1.8e9 + 300 * w + d * 0.01)
            flats.append(world.counts(rng, n, shift=shift))
    order = np.argsort(starts, kind="stable")
    return np.array(names, dtype=object)[order], np.array(starts)[order], np.stack(flats)[order]


def test_device_alerts_need_k_of_m_windows_and_survive_bh_across_devices(world: World) -> None:
    settings = DriftSettings(k=2, m=3)
    rng = np.random.default_rng(10)
    drifting = {"dev001": [0.8, 0.8, 0.8], "dev002": [0.0, 0.8, 0.8], "dev003": [0.8, 0.0, 0.0]}
    devices, starts, flat = _fleet(world, rng, drifting)
    ev = drift.evaluate_counts(world.ref, devices, starts, flat, settings)
    assert set(ev.device_alerts) == {"dev001", "dev002"}  # dev003 drifted in only 1 of 3 windows
    assert "in.f0" in ev.device_alerts["dev001"]
    assert ev.tested_device_windows == 180
    assert 0 < ev.cutoff < settings.alpha


def test_fleet_level_pools_devices_and_small_windows_are_not_tested(world: World) -> None:
    settings = DriftSettings(k=2, m=3, min_n=100)
    rng = np.random.default_rng(11)
    # Every device shifted a little, each window too small to test alone: only the pooled test sees it.
    drifting = {f"dev{d:03d}": [0.3, 0.3, 0.3] for d in range(60)}
    devices, starts, flat = _fleet(world, rng, drifting, n=50)
    ev = drift.evaluate_counts(world.ref, devices, starts, flat, settings)
    assert ev.tested_device_windows == 0 and ev.untested_small_windows == 180
    assert ev.fleet_flags == [True, True, True] and ev.fleet_alert
    assert "in.f0" in ev.fleet_channels
    quiet = drift.evaluate_counts(world.ref, *_fleet(world, rng, {}, n=50), settings)
    assert not quiet.fleet_alert and not any(quiet.fleet_flags)


def test_k_of_m_rule() -> None:
    assert drift.k_of_m([True, False, True], 2, 3)
    assert not drift.k_of_m([True, True, False, False, True], 2, 3)
    assert dataclasses.asdict(DriftSettings())["k"] == 2


def test_fused_window_tests_agree_with_the_reference_implementations(world: World) -> None:
    from edge_kit.fleet import stats

    rng = np.random.default_rng(12)
    flat = np.stack([world.counts(rng, n, shift=s) for n, s in [(80, 0.0), (500, 0.3), (3000, 0.0), (2000, 1.0)]])
    counts = world.ref.unflatten(flat)
    r = drift.test_windows(world.ref, world.ref.unflatten(flat, np.float32), DriftSettings())
    ref = world.ref
    np.testing.assert_allclose(r.ks, stats.ks_statistic(ref.counts, counts), atol=1e-5)
    np.testing.assert_allclose(r.wasserstein, stats.wasserstein(ref.counts, counts, ref.edges, ref.std),
                               rtol=1e-4, atol=1e-5)
    chi2, chi2_p, valid = stats.chi_square(ref.counts, counts)
    np.testing.assert_array_equal(r.chi2_valid, valid)
    np.testing.assert_allclose(r.chi2, chi2, rtol=1e-4)
    np.testing.assert_allclose(r.chi2_p, chi2_p, rtol=1e-3, atol=1e-12)
    c = ref.channel_names.index("out.pred")
    np.testing.assert_allclose(r.tvd[:, c], stats.total_variation(ref.counts, counts)[:, c], atol=1e-6)
    numeric = ~ref.is_class
    assert not valid[0, numeric].any() and valid[2].all()  # n = 80 is too small for 32-bin chi-square
    assert valid[0, c]  # ... but not for the 3-class predicted-class test


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000), shift=st.floats(0.0, 1.5),
       phis=st.lists(st.floats(1.0, 1e6), min_size=2, max_size=2))
def test_every_channel_p_value_is_non_decreasing_in_the_design_effect(world: World, seed: int, n: int,
                                                                    shift: float, phis: list[float]) -> None:
    rng = np.random.default_rng(seed)
    flat = world.counts(rng, n, shift=shift)[None, :]
    counts = world.ref.unflatten(flat, np.float32)
    channels = len(world.ref.channel_names)
    per_channel = rng.uniform(1.0, 3.0, channels)  # phi may differ by channel; scale it as a whole
    lo, hi = sorted(phis)
    settings_ = DriftSettings(max_design_effect=50.0)
    r_lo = drift.test_windows(world.ref, counts, settings_, dispersion=(lo * per_channel)[None, :])
    r_hi = drift.test_windows(world.ref, counts, settings_, dispersion=(hi * per_channel)[None, :])
    for name in ("ks_p", "chi2_p", "p_channel", "p_adjusted"):
        assert np.all(getattr(r_hi, name) >= getattr(r_lo, name) - 1e-9), name
    assert np.all(r_hi.dispersion <= 50.0)  # bounded whatever the window claims
