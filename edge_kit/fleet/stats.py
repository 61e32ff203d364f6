"""Two-sample tests and effect sizes computed from binned counts, vectorised over devices x channels.

Every function takes the reference counts `ref` with shape (C, B) and current counts `cur` with
shape (..., C, B) (any leading axes: windows, devices), channels padded with empty bins to a common
B. Empty padding bins change nothing: CDFs stay flat across them and chi-square ignores them.

Binning error of the KS statistic. The CDFs are known exactly at the bin edges, so the binned
statistic D_b = max_i |F_ref(e_i) - F_cur(e_i)| over edges e_i never exceeds the raw-sample
statistic D, and inside bin i each CDF moves by at most its own bin mass, so

    D_b <= D <= D_b + max_i max(r_i, c_i)

where r_i and c_i are the reference and current fractions in bin i (about 1/B for quantile bins).
Because D_b <= D, its p-value is never smaller than the raw test's: the binned KS is conservative,
its false alarm rate stays at or below alpha, and the price is a little power (benchmarks/bench_drift.py).
That bound covers KS only. Chi-square on the same bins is a test of the binned distributions in its
own right (exact in its null, approximate only through its chi-square limit, which is why it is
used only where Cochran's rule holds, and a simulated p-value replaces it for class counts below).

Dependence. Both tests assume the window's inferences are independent draws. Correlated inputs
(repeated frames, a slowly moving sensor) make counts over-dispersed against the multinomial by a
design effect phi >= 1; `dispersion_factor` estimates it from the agent's block statistic and the
tests then use the effective sample size n / phi (KS) and X / phi (chi-square, Rao-Scott's
first-order correction).
"""

from __future__ import annotations

import numpy as np
from scipy import special


def _fractions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = counts / n[..., None]
    return np.nan_to_num(frac), n


def ks_statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Binned KS statistic D_b (..., C): largest CDF gap at the bin edges."""
    r, _ = _fractions(ref)
    c, _ = _fractions(cur)
    gap = np.abs(np.cumsum(c, axis=-1) - np.cumsum(r, axis=-1))
    return np.asarray(gap.max(axis=-1))


def ks_binning_bound(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Upper bound of D - D_b (see the module docstring): the largest bin mass of either sample."""
    r, _ = _fractions(ref)
    c, _ = _fractions(cur)
    return np.asarray(np.maximum(r, c).max(axis=-1))


# Stephens' factor en + 0.12 + 0.11 / en falls until en = sqrt(0.11) and rises after: below that point
# a smaller sample would give a *larger* factor, and p would go to 0 as n (or n / phi) goes to 0.
_STEPHENS_MIN_EN = float(np.sqrt(0.11))


def ks_pvalue(d: np.ndarray, n_ref: np.ndarray, n_cur: np.ndarray) -> np.ndarray:
    """Asymptotic two-sample KS p-value with Stephens' small-sample correction.

    Non-decreasing as either sample size falls and as d falls (tests check it): the effective n of a
    correlated window (n / phi) can only make the test less significant, never more. Below the
    factor's minimum (en < 0.33, a sample of well under one draw) it is held at that minimum.
    """
    n_ref = np.asarray(n_ref, dtype=np.float64)
    n_cur = np.asarray(n_cur, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        en = np.maximum(np.sqrt(n_ref * n_cur / (n_ref + n_cur)), _STEPHENS_MIN_EN)
        lam = (en + 0.12 + 0.11 / en) * d
    p = special.kolmogorov(np.nan_to_num(lam))
    return np.where((n_cur > 0) & (n_ref > 0), np.clip(p, 0.0, 1.0), 1.0)


def chi_square_min_n(ref: np.ndarray) -> np.ndarray:
    """Smallest window n for which chi-square's approximation holds, per channel (C,).

    Cochran's rule on the counts expected under the null (n x reference fraction): every bin the
    reference uses expects at least 1, and 80% of them at least 5.
    """
    r, _ = _fractions(ref)
    out = np.empty(r.shape[0])
    for c, row in enumerate(r):
        p = np.sort(row[row > 0])[::-1]
        if p.size < 2:
            out[c] = np.inf
            continue
        k = int(np.ceil(0.8 * p.size))
        out[c] = max(1.0 / p[-1], 5.0 / p[k - 1])
    return out


def chi_square(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chi-square test of homogeneity on the 2 x B table (reference row, current row).

    Returns (statistic, p_value, valid). Where the window is too small for the approximation
    (`chi_square_min_n`) the p-value is 1, so an underpowered test never raises an alarm on its own.
    Uses the closed form for 2 x B tables: N n sum_i (p_i - q_i)^2 / (R_i + C_i).
    """
    ref = np.asarray(ref, dtype=np.float64)
    cur = np.asarray(cur, dtype=np.float64)
    stat = chi_square_statistic(ref, cur)
    n_cur = cur.sum(axis=-1)
    df = ((ref + cur) > 0).sum(axis=-1) - 1
    valid = (n_cur >= chi_square_min_n(ref)) & (df > 0) & (n_cur > 0)
    p = np.where(valid, special.chdtrc(np.maximum(df, 1), stat), 1.0)
    return stat, p, valid


def chi_square_statistic(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """The 2 x B homogeneity statistic of `chi_square`, without validity checks: (..., C)."""
    ref = np.asarray(ref, dtype=np.float64)
    cur = np.asarray(cur, dtype=np.float64)
    r, n_ref = _fractions(ref)
    c, n_cur = _fractions(cur)
    col = ref + cur
    used = col > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        term = np.where(used, (r - c) ** 2 / np.where(used, col, 1.0), 0.0)
    return np.asarray(n_ref * n_cur * term.sum(axis=-1))


SIMULATIONS = 1999  # p-values resolve to 1/2000: enough below alpha / channels for 30-100 channels
_SIMULATED: dict[tuple[bytes, int], np.ndarray] = {}


def simulated_chi_square_pvalue(ref: np.ndarray, n: int, statistic: np.ndarray, *, seed: int = 0,
                                simulations: int = SIMULATIONS) -> np.ndarray:
    """Monte-Carlo p-value of the homogeneity statistic of one channel's class counts.

    For windows too small for chi-square's approximation. Both samples are drawn from the
    reference fractions (the null: one common distribution), the same statistic is computed, and
    p = (1 + #{simulated >= observed}) / (simulations + 1), which is a valid p-value at any n.
    Seeded and cached per (reference, n), so a window gets the same answer on every evaluation.
    """
    counts = np.asarray(ref, dtype=np.int64)
    key = (counts.tobytes(), int(n))
    null = _SIMULATED.get(key)
    if null is None:
        rng = np.random.default_rng([seed, int(n)])
        p = counts / max(int(counts.sum()), 1)
        sim_ref = rng.multinomial(int(counts.sum()), p, size=simulations)
        sim_cur = rng.multinomial(int(n), p, size=simulations)
        null = np.sort(chi_square_statistic(sim_ref, sim_cur))
        if len(_SIMULATED) > 256:
            _SIMULATED.clear()
        _SIMULATED[key] = null
    # Observed values within float rounding of a simulated one count as ties (>=).
    above = null.size - np.searchsorted(null, np.asarray(statistic, dtype=np.float64) * (1 - 1e-9), side="left")
    return np.asarray((1.0 + above) / (null.size + 1.0))


def dispersion_factor(chi2: np.ndarray, df: np.ndarray, prior_df: float = 30.0,
                      max_phi: float = np.inf) -> np.ndarray:
    """Design effect phi >= 1 per channel from the agent's between-block chi-square (X, df).

    Under independent draws E[X] = df, so X / df estimates the over-dispersion of the counts. A
    channel with few degrees of freedom is noisy on its own: its estimate is shrunk towards the
    window's average over channels (`prior_df` pseudo degrees of freedom). Where no statistic came
    (old payloads, df = 0) phi is 1: the tests are then those of independent draws, as before.
    Arrays are (..., C); NaN means "not reported". At most `max_phi`: what a device reports is bounded.
    """
    x = np.nan_to_num(np.asarray(chi2, dtype=np.float64))
    d = np.nan_to_num(np.asarray(df, dtype=np.float64))
    total_d = d.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(total_d > 0, x.sum(axis=-1, keepdims=True) / total_d, 1.0)
        phi = np.where(d + prior_df > 0, (x + prior_df * pooled) / (d + prior_df), 1.0)
    phi = np.where(total_d > 0, phi, 1.0)
    return np.asarray(np.clip(np.nan_to_num(phi, nan=max_phi, posinf=max_phi), 1.0, max_phi))


REPEAT_DESIGN_EFFECT_MAX = 1e6  # n_eff = 0 with n > 0: as dependent as can be (tests cap phi far lower)


def repeat_design_effect(n: int, n_eff: float | None) -> float | None:
    """Design effect of exact repeats, n / n_eff (>= 1; None where the window did not report n_eff).

    Kish's design effect: n_eff = n^2 / sum(m_i^2) over the multiplicities of identical inputs.
    A device cannot claim more than independent draws: n_eff above n counts as n.
    """
    if n_eff is None or n <= 0:
        return None
    if n_eff <= n / REPEAT_DESIGN_EFFECT_MAX:
        return REPEAT_DESIGN_EFFECT_MAX
    return max(1.0, n / n_eff)


def wasserstein(ref: np.ndarray, cur: np.ndarray, edges: np.ndarray, ref_std: np.ndarray) -> np.ndarray:
    """Wasserstein-1 distance in units of the reference standard deviation.

    Integrates |F_ref - F_cur| over [first edge, last edge] with both CDFs linear inside each bin
    (trapezoid on the absolute gap). `edges` is (C, B + 1), padded by repeating the last edge.
    """
    r, _ = _fractions(ref)
    c, _ = _fractions(cur)
    zero = np.zeros((*c.shape[:-1], 1))
    gap = np.abs(np.concatenate([zero, np.cumsum(c, axis=-1) - np.cumsum(r, axis=-1)], axis=-1))
    widths = np.diff(edges, axis=-1)
    w = ((gap[..., 1:] + gap[..., :-1]) * 0.5 * widths).sum(axis=-1)
    scale = np.where(np.asarray(ref_std) > 0, ref_std, 1.0)
    return np.asarray(w / scale)


def total_variation(ref: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Half the L1 distance of the bin fractions: the effect size for the predicted class."""
    r, _ = _fractions(ref)
    c, _ = _fractions(cur)
    return np.asarray(0.5 * np.abs(c - r).sum(axis=-1))


def psi(ref: np.ndarray, cur: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Population stability index; NaN where n < 20 x bins (too few samples for PSI to mean much).

    Read it with the usual bands: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.
    """
    r, _ = _fractions(ref)
    c, n = _fractions(cur)
    eps = 1e-4  # keeps empty bins finite without dominating the sum
    rr, cc = np.maximum(r, eps), np.maximum(c, eps)
    used = (np.broadcast_to(r, c.shape) > 0) | (c > 0)
    value = np.where(used, (cc - rr) * np.log(cc / rr), 0.0).sum(axis=-1)
    return np.where(n >= 20 * np.asarray(bins), value, np.nan)


def psi_band(value: float | None) -> str | None:
    if value is None or not np.isfinite(value):
        return None
    return "stable" if value < 0.1 else "moderate" if value < 0.25 else "major"


def bonferroni(p: np.ndarray, tests: int) -> np.ndarray:
    return np.asarray(np.minimum(np.asarray(p, dtype=np.float64) * tests, 1.0))


def benjamini_hochberg(p: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """BH-adjusted q-values (same shape) and the step-up cutoff: p <= cutoff are the discoveries.

    The cutoff is alpha * R / M for the largest R with p_(R) <= alpha * R / M, or 0 when none.
    """
    flat = np.asarray(p, dtype=np.float64).ravel()
    m = flat.size
    if m == 0:
        return np.asarray(p, dtype=np.float64), 0.0
    order = np.argsort(flat)
    ranked = flat[order]
    ranks = np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate((ranked * m / ranks)[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    passing = np.nonzero(ranked <= alpha * ranks / m)[0]
    cutoff = float(alpha * (passing[-1] + 1) / m) if passing.size else 0.0
    return q.reshape(np.shape(p)), cutoff
