"""The binned statistics against scipy on the raw samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from device_agent.monitoring.reference import bin_counts, quantile_edges
from edge_kit.fleet import stats


def _binned(ref_raw: np.ndarray, cur_raw: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edges = quantile_edges(ref_raw, bins)
    return bin_counts(ref_raw, edges)[None, :], bin_counts(cur_raw, edges)[None, None, :], edges


@pytest.mark.parametrize("bins", [8, 32, 128])
@pytest.mark.parametrize("shift,scale,n", [(0.0, 1.0, 200), (0.25, 1.0, 500), (0.5, 1.0, 100), (0.0, 2.0, 1000),
                                           (1.0, 0.5, 50)])
def test_binned_ks_within_documented_bound_of_raw_ks(bins: int, shift: float, scale: float, n: int) -> None:
    rng = np.random.default_rng(bins * 1000 + n)
    ref_raw = rng.normal(size=5000)
    cur_raw = rng.normal(shift, scale, size=n)
    ref, cur, _ = _binned(ref_raw, cur_raw, bins)
    d_binned = float(stats.ks_statistic(ref, cur)[0, 0])
    bound = float(stats.ks_binning_bound(ref, cur)[0, 0])
    raw = sps.ks_2samp(ref_raw, cur_raw)
    assert d_binned <= raw.statistic + 1e-12
    assert raw.statistic <= d_binned + bound + 1e-12
    # Conservative: the binned p-value is never (meaningfully) below the raw asymptotic one.
    p_binned = float(stats.ks_pvalue(np.array(d_binned), 5000, n))
    p_raw_asymp = float(sps.ks_2samp(ref_raw, cur_raw, method="asymp").pvalue)
    assert p_binned >= p_raw_asymp * 0.9


def test_binned_ks_pvalue_close_to_raw_with_fine_bins() -> None:
    rng = np.random.default_rng(3)
    ref_raw, cur_raw = rng.normal(size=20000), rng.normal(0.15, 1.0, size=800)
    ref, cur, _ = _binned(ref_raw, cur_raw, 256)
    d = stats.ks_statistic(ref, cur)
    p = float(stats.ks_pvalue(d, 20000, 800)[0, 0])
    assert p == pytest.approx(sps.ks_2samp(ref_raw, cur_raw).pvalue, rel=0.5, abs=1e-4)


def test_chi_square_matches_scipy_contingency() -> None:
    rng = np.random.default_rng(4)
    ref_raw, cur_raw = rng.normal(size=3000), rng.normal(0.0, 1.4, size=600)
    ref, cur, _ = _binned(ref_raw, cur_raw, 16)
    stat, p, valid = stats.chi_square(ref, cur)
    expected = sps.chi2_contingency(np.vstack([ref[0], cur[0, 0]]), correction=False)
    assert bool(valid[0, 0])
    assert float(stat[0, 0]) == pytest.approx(expected.statistic, rel=1e-9)
    assert float(p[0, 0]) == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-300)


def test_chi_square_refuses_when_expected_counts_are_too_small() -> None:
    ref = np.full((1, 32), 100)
    cur = np.zeros((1, 1, 32), dtype=np.int64)
    cur[0, 0, :20] = 1  # n = 20 over 32 bins: expected < 1 per bin
    _, p, valid = stats.chi_square(ref, cur)
    assert not bool(valid[0, 0]) and float(p[0, 0]) == 1.0


def test_wasserstein_in_reference_sd_units_close_to_scipy() -> None:
    rng = np.random.default_rng(5)
    ref_raw, cur_raw = rng.normal(0, 2.0, size=20000), rng.normal(1.0, 2.0, size=5000)
    ref, cur, edges = _binned(ref_raw, cur_raw, 64)
    w = float(stats.wasserstein(ref, cur, edges[None, :], np.array([ref_raw.std()]))[0, 0])
    exact = sps.wasserstein_distance(ref_raw, cur_raw) / ref_raw.std()
    assert w == pytest.approx(exact, abs=0.05)  # a 1 sd shift is 0.5 reference sd here
    assert w == pytest.approx(0.5, abs=0.06)


def test_total_variation_and_psi_bands() -> None:
    ref = np.array([[50, 50, 0, 0]])
    cur = np.array([[[25, 75, 0, 0]]])
    assert float(stats.total_variation(ref, cur)[0, 0]) == pytest.approx(0.25)
    bins = np.array([[2]])
    assert np.isnan(stats.psi(ref, np.array([[[5, 15, 0, 0]]]), bins)[0, 0])  # n = 20 < 20 x 2 bins: not shown
    value = float(stats.psi(ref, cur, bins)[0, 0])
    assert value == pytest.approx(-0.25 * np.log(0.25 / 0.5) + 0.25 * np.log(0.75 / 0.5), rel=1e-3)
    assert stats.psi_band(0.05) == "stable" and stats.psi_band(0.2) == "moderate" and stats.psi_band(0.3) == "major"
    assert stats.psi_band(float("nan")) is None


def test_benjamini_hochberg_matches_scipy() -> None:
    rng = np.random.default_rng(6)
    p = np.concatenate([rng.uniform(size=90), rng.uniform(0, 1e-3, size=10)])
    q, cutoff = stats.benjamini_hochberg(p, 0.05)
    np.testing.assert_allclose(q, sps.false_discovery_control(p), rtol=1e-12)
    assert set(np.nonzero(p <= cutoff)[0]) == set(np.nonzero(q <= 0.05)[0])
    assert stats.benjamini_hochberg(np.array([0.5, 0.9]), 0.05)[1] == 0.0


def test_bonferroni_caps_at_one() -> None:
    np.testing.assert_allclose(stats.bonferroni(np.array([0.001, 0.2]), 10), [0.01, 1.0])


# -- monotone where it must be: more dependence (a larger phi) never makes a test more significant ------

_sizes = st.floats(1e-6, 1e7, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(d=st.floats(0.0, 1.0), n_ref=st.floats(1.0, 1e6), a=_sizes, b=_sizes)
def test_ks_pvalue_never_falls_as_the_effective_n_falls(d: float, n_ref: float, a: float, b: float) -> None:
    small, large = min(a, b), max(a, b)
    p_small = float(stats.ks_pvalue(np.float64(d), np.float64(n_ref), np.float64(small)))
    p_large = float(stats.ks_pvalue(np.float64(d), np.float64(n_ref), np.float64(large)))
    assert 0.0 <= p_large <= p_small + 1e-12 <= 1.0 + 1e-12


@settings(max_examples=300, deadline=None)
@given(a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0), n=_sizes)
def test_ks_pvalue_never_falls_as_the_statistic_falls(a: float, b: float, n: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert stats.ks_pvalue(np.float64(hi), np.float64(500), np.float64(n)) <= \
        stats.ks_pvalue(np.float64(lo), np.float64(500), np.float64(n)) + 1e-12


def test_a_tiny_effective_n_cannot_fabricate_significance() -> None:
    # n / phi -> 0 used to blow up Stephens' correction: p went to 0 for any visible D.
    assert float(stats.ks_pvalue(np.float64(0.5), np.float64(500), np.float64(1e-4))) > 0.5


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(0.0, 1e300), min_size=1, max_size=6), df=st.integers(0, 10**9),
       factor=st.floats(1.0, 1e6), cap=st.floats(1.0, 100.0))
def test_dispersion_factor_is_bounded_and_monotone_in_the_statistic(x: list[float], df: int, factor: float,
                                                                    cap: float) -> None:
    chi2 = np.array([x])
    dfs = np.full_like(chi2, df)
    phi = stats.dispersion_factor(chi2, dfs, max_phi=cap)
    more = stats.dispersion_factor(chi2 * factor, dfs, max_phi=cap)
    assert np.all((phi >= 1.0) & (phi <= cap)) and np.all(more >= phi - 1e-9)


def test_repeat_design_effect_bounds_what_a_device_can_claim() -> None:
    assert stats.repeat_design_effect(500, None) is None
    assert stats.repeat_design_effect(500, 600.0) == 1.0  # never fewer than independent draws
    assert stats.repeat_design_effect(500, 250.0) == 2.0
    assert stats.repeat_design_effect(500, 0.0) == stats.REPEAT_DESIGN_EFFECT_MAX
