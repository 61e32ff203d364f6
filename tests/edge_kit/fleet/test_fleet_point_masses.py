"""Point masses, untestable channels and small class windows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from device_agent.bundle.format import REFERENCE, canonical_json, write_bundle
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import Reference, bin_counts, build_reference, point_mass_edges, quantile_edges
from device_agent.monitoring.summary import Histogrammer
from edge_kit.commands import inspect
from edge_kit.fleet import drift, stats
from edge_kit.fleet.reference_index import ModelReference
from edge_kit.fleet.settings import DriftSettings

LABELS = ["a", "b", "c", "d"]
SETTINGS = DriftSettings(alpha=0.01, effect_wasserstein=0.0, effect_class_tvd=0.0, min_n=10)


def _sparse(rng: np.random.Generator, n: int, noise: float = 0.0) -> np.ndarray:
    """A pixel-like value: exactly 0 in 99% of samples, in (0.2, 1] otherwise, noise clipped to [0, 1]."""
    x = np.where(rng.random(n) < 0.99, 0.0, rng.uniform(0.2, 1.0, n))
    return np.clip(x + rng.normal(0.0, noise, n), 0.0, 1.0) if noise else x


class SparseWorld:
    """Three features: f0 99% zeros, f1 Gaussian, f2 constant; a 4-class linear model."""

    def __init__(self) -> None:
        self.plan = MonitorPlan.for_features(["f0", "f1", "f2"], LABELS)
        self.w = np.random.default_rng(7).normal(size=(3, 4))
        rng = np.random.default_rng(8)
        self.reference = build_reference(self.plan, self.plan.values(*self.batch(rng, 20000)), 32)
        self.hist = Histogrammer(self.reference)
        self.ref = ModelReference.from_reference(self.reference, sha256="e" * 64, name="sparse", version="1",
                                                 labels=LABELS)

    def batch(self, rng: np.random.Generator, n: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([_sparse(rng, n, noise), rng.normal(size=n), np.full(n, 3.0)], axis=1)
        return x, x @ self.w

    def counts(self, rng: np.random.Generator, n: int, noise: float = 0.0) -> np.ndarray:
        c = self.hist.counts(self.plan.values(*self.batch(rng, n, noise)))
        return self.ref.unflatten(c.reshape(-1)[self.ref.flat_index])[0]


@pytest.fixture(scope="module")
def world() -> SparseWorld:
    return SparseWorld()


def test_a_value_holding_99_percent_gets_an_exact_bin_and_edges_increase(world: SparseWorld) -> None:
    c = world.reference.channels["in.f0"]
    assert c.exact == (0.0,)
    assert np.all(np.diff(c.edges) > 0)
    # The bin holding 0 holds nothing else: the next edge is within the atom tolerance of 0.
    zero_bin = int(np.searchsorted(c.edges[1:-1], 0.0, side="right"))
    assert c.edges[zero_bin + 1] <= 1e-5
    assert c.counts[zero_bin] == pytest.approx(0.99 * c.n, rel=0.01)
    # Mixed atoms and a continuous part: every bin has reference mass, edges strictly increase.
    rng = np.random.default_rng(0)
    v = np.concatenate([np.zeros(400), np.ones(300), rng.normal(0.5, 0.2, 300)])
    edges, exact = point_mass_edges(v, 16)
    assert exact == (0.0, 1.0) and np.all(np.diff(edges) > 0)
    assert (bin_counts(v, edges) > 0).all() and len(edges) - 1 <= 16


def test_noise_of_sd_0_01_on_a_99_percent_zero_channel_is_detected_at_n_200(world: SparseWorld) -> None:
    rng = np.random.default_rng(11)
    windows = np.stack([world.counts(rng, 200, noise=0.01) for _ in range(40)])
    r = drift.test_windows(world.ref, windows, SETTINGS)
    f0 = world.ref.channel_names.index("in.f0")
    detected = (r.p_adjusted[:, f0] <= SETTINGS.alpha).mean()
    assert detected >= 0.95, f"detected in {detected:.0%} of windows"
    # The same windows without noise: no false alarms from the exact-value bin.
    clean = np.stack([world.counts(rng, 200) for _ in range(40)])
    assert not (drift.test_windows(world.ref, clean, SETTINGS).p_adjusted[:, f0] <= SETTINGS.alpha).any()


def test_a_constant_channel_is_untestable_listed_and_not_counted(world: SparseWorld) -> None:
    assert world.reference.channels["in.f2"].bins == 1
    assert "in.f2" in world.reference.untestable()
    assert "in.f2" in world.ref.untestable and world.ref.describe()["untestable"] == world.ref.untestable
    rng = np.random.default_rng(12)
    r = drift.test_windows(world.ref, np.stack([world.counts(rng, 300)]), SETTINGS)
    testable = len(world.ref.channel_names) - len(world.ref.untestable)
    np.testing.assert_allclose(r.p_adjusted, np.minimum(r.p_channel * testable, 1.0))
    f2 = world.ref.channel_names.index("in.f2")
    assert r.p_channel[0, f2] == 1.0 and not r.effect_ok[0, f2]
    # The reason travels in reference.json and survives the round trip.
    again = Reference.from_json(json.loads(json.dumps(world.reference.to_json())))
    assert again.untestable() == world.reference.untestable()


def test_an_old_reference_without_the_new_keys_loads_and_tests_as_before() -> None:
    """A bundle built before exact-value bins: plain quantile edges, no `exact`/`untestable` keys."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5000, 2))
    x[:, 1] = 2.0
    old = {"schema": "edgekit.reference/1", "channels": {}}
    for j, name in enumerate(["in.a", "in.b"]):
        edges = quantile_edges(x[:, j], 32)
        old["channels"][name] = {"kind": "numeric", "edges": edges.tolist(),
                                 "counts": bin_counts(x[:, j], edges).tolist(), "n": 5000,
                                 "mean": float(x[:, j].mean()), "std": float(x[:, j].std())}
    reference = Reference.from_json(old)
    assert reference.channels["in.a"].bins == 32 and reference.channels["in.b"].bins == 1
    ref = ModelReference.from_reference(reference, sha256="d" * 64, name="old", version="1", labels=[])
    assert list(ref.untestable) == ["in.b"]
    cur = np.zeros((1, 2, 32), dtype=np.int64)
    cur[0, 0] = bin_counts(rng.normal(0.3, 1.0, 400), reference.channels["in.a"].edges)
    cur[0, 1, 0] = 400
    r = drift.test_windows(ref, cur, SETTINGS)
    # Channel in.a is tested exactly as before (KS + chi-square on the stored edges), counted once.
    d = stats.ks_statistic(ref.counts[:1], cur[:, :1])[0, 0]
    np.testing.assert_allclose(r.ks[0, 0], d, rtol=1e-6)
    assert r.p_adjusted[0, 0] == pytest.approx(r.p_channel[0, 0])


def test_binned_ks_on_point_mass_edges_stays_within_the_documented_bound() -> None:
    rng = np.random.default_rng(21)
    ref_raw = _sparse(rng, 5000)
    ref_raw[:1000] = rng.normal(0.5, 0.1, 1000)
    edges, _ = point_mass_edges(ref_raw, 32)
    for noise, n in [(0.0, 200), (0.01, 200), (0.05, 1000), (0.0, 50)]:
        cur_raw = _sparse(rng, n, noise)
        ref, cur = bin_counts(ref_raw, edges)[None, :], bin_counts(cur_raw, edges)[None, None, :]
        d_binned = float(stats.ks_statistic(ref, cur)[0, 0])
        bound = float(stats.ks_binning_bound(ref, cur)[0, 0])
        raw = sps.ks_2samp(ref_raw, cur_raw).statistic
        assert d_binned <= raw + 1e-12
        assert raw <= d_binned + bound + 1e-12


def test_small_class_windows_get_a_simulated_pvalue_instead_of_one() -> None:
    ref = np.array([700, 200, 60, 40])  # chi-square needs n >= 125 here (Cochran)
    rng = np.random.default_rng(3)
    assert stats.chi_square_min_n(ref[None, :])[0] > 30
    # A knocked-out majority class at n = 30 is obvious; before, p was 1 at this n.
    cur = np.array([[0, 20, 6, 4]])
    x = stats.chi_square_statistic(ref, cur)
    assert stats.simulated_chi_square_pvalue(ref, 30, x)[0] <= 0.001
    # Under the null the simulated p-value is (close to) uniform: rejections at 0.05 stay near 0.05.
    null = rng.multinomial(30, ref / ref.sum(), size=2000)
    p = stats.simulated_chi_square_pvalue(ref, 30, stats.chi_square_statistic(ref, null))
    assert (p <= 0.05).mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 2000)
    # Deterministic: the same window gets the same p-value on every evaluation.
    assert stats.simulated_chi_square_pvalue(ref, 30, x)[0] == stats.simulated_chi_square_pvalue(ref, 30, x)[0]


def test_the_class_channel_flags_a_knocked_out_class_in_a_small_window(world: SparseWorld) -> None:
    rng = np.random.default_rng(13)
    pred = world.ref.channel_names.index("out.pred")
    window = world.counts(rng, 40)[None].copy()
    top = int(np.argmax(window[0, pred]))
    moved = window[0, pred, top]
    window[0, pred, top] = 0
    window[0, pred, (top + 1) % 4] += moved
    r = drift.test_windows(world.ref, window, SETTINGS)
    assert not r.chi2_valid[0, pred]
    assert r.chi2_p[0, pred] < 0.01


def test_inspect_lists_untestable_channels_with_the_reason(tmp_path: Path, world: SparseWorld) -> None:
    manifest = {"name": "sparse", "version": "1", "monitoring": world.plan.to_manifest()}
    path = write_bundle(tmp_path, manifest, {"model.onnx": b"placeholder",
                                             REFERENCE: canonical_json(world.reference.to_json())})
    info = inspect.run(argparse.Namespace(bundle=str(path), json=True))
    assert info["monitoring"]["untestable"] == {"in.f2": world.reference.untestable()["in.f2"]}
    assert "untestable in.f2: fewer than 2 usable bins" in inspect.render(info)
