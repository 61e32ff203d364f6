"""Drift decisions per model version, for the whole fleet (windows pooled) and for each device.

Tests per channel, against the bundle's reference histogram:
- numeric channels (inputs, each softmax output, confidence): binned two-sample KS, and chi-square
  on the same bins (it catches spread changes KS misses), Bonferroni over the two;
- the predicted class: chi-square on the class counts.
Testing every softmax output with KS under Bonferroni plus chi-square on the predicted class is the
black-box shift detector that did best in Rabanser, Günnemann and Lipton, "Failing Loudly"
(NeurIPS 2019); the input channels add a direct view of what changed.

Multiple testing and practical relevance:
- Bonferroni across one model's channels: a window's channel p-values are multiplied by the number
  of channels, so a window has at most alpha chance of any false flag.
- Benjamini-Hochberg across devices: the device windows' p-values (min over channels, Bonferroni'd)
  go through BH at alpha; its step-up cutoff then decides which channels of which device flag.
- A window with fewer than `min_n` inferences is not tested; a flag needs the corrected p-value at
  or below the cutoff and an effect above the practical threshold (Wasserstein distance in reference
  standard deviations for numeric channels, total variation for the predicted class), and an alert
  needs k flagged windows among the last m tested ones. Big fleets make tiny, harmless differences
  significant; the effect threshold and the k-of-m rule keep those from paging anyone.

One device, one voice: in the fleet pool a device's n and design effect are bounded
(`device_scale`, `window_design_effect`), and a bucket's channel is flagged only if it stays flagged
with any one device left out, so no single device raises or (beyond its bounded share) removes a
fleet alert; its own device-level test is its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special

from edge_kit.fleet import dispersion_trailer as disp
from edge_kit.fleet import stats
from edge_kit.fleet.reference_index import ModelReference
from edge_kit.fleet.settings import DriftSettings
from edge_kit.fleet.storage import Storage, decode_counts

FLEET_BUCKETS_READ = 4  # the fleet level reads 4 m bucket periods to find m with enough data
CHUNK = 1024  # windows tested at once: bounds memory at 10,000s of devices x 100s of channels


@dataclass
class ChannelResults:
    """Per-channel test results for a stack of windows: every array is (W, C)."""

    n: np.ndarray  # (W,)
    ks: np.ndarray
    ks_p: np.ndarray
    chi2: np.ndarray
    chi2_p: np.ndarray
    chi2_valid: np.ndarray
    wasserstein: np.ndarray
    tvd: np.ndarray
    p_channel: np.ndarray  # each channel's tests combined (Bonferroni over its own tests)
    p_adjusted: np.ndarray  # Bonferroni across the model's channels
    effect: np.ndarray  # the effect the practical threshold applies to
    effect_ok: np.ndarray
    psi: np.ndarray | None = None
    ks_bound: np.ndarray | None = None
    dispersion: np.ndarray | None = None  # (W, C) design effect phi the tests divided by


@dataclass(frozen=True)
class PreparedReference:
    """What the tests need from a reference, computed once per model version."""

    cdf: np.ndarray  # (C, B) reference CDF at the upper edge of each bin
    fractions: np.ndarray  # (C, B)
    w1_weights: np.ndarray  # (C, B) trapezoid weights / reference sd: W1 = sum |gap| * weights
    chi_denominator_floor: np.ndarray  # (C, B): reference counts, empty bins a tiny positive number
    chi_min_n: np.ndarray  # (C,)
    ref_bins_used: np.ndarray  # (C,)
    empty_ref_bins: np.ndarray  # (C, B) bool: real bins the reference never hit
    class_idx: np.ndarray
    thresholds: np.ndarray  # (C,) practical effect thresholds


_PREPARED: dict[tuple[str, float, float], PreparedReference] = {}


def prepare(ref: ModelReference, settings: DriftSettings) -> PreparedReference:
    key = (ref.sha256 + str(id(ref)), settings.effect_wasserstein, settings.effect_class_tvd)
    found = _PREPARED.get(key)
    if found is not None:
        return found
    counts = ref.counts.astype(np.float64)
    fractions = counts / counts.sum(axis=1, keepdims=True)
    widths = np.diff(ref.edges, axis=1)  # (C, B)
    # |gap| is linear inside a bin between its values at the two edges (gap = 0 at the first edge),
    # so the trapezoid rule weights the gap at edge i by the mean width of the bins on either side.
    weights = (widths + np.concatenate([widths[:, 1:], np.zeros((len(widths), 1))], axis=1)) / 2
    weights /= np.where(ref.std > 0, ref.std, 1.0)[:, None]
    real = np.arange(ref.width)[None, :] < ref.bins[:, None]
    is_class = ref.is_class
    prepared = PreparedReference(
        cdf=np.cumsum(fractions, axis=1).astype(np.float32),
        fractions=fractions.astype(np.float32),
        w1_weights=weights.astype(np.float32),
        chi_denominator_floor=np.where(counts > 0, counts, 1e-30).astype(np.float32),
        chi_min_n=stats.chi_square_min_n(ref.counts),
        ref_bins_used=(counts > 0).sum(axis=1),
        empty_ref_bins=real & (counts == 0),
        class_idx=np.nonzero(is_class)[0],
        thresholds=np.where(is_class, settings.effect_class_tvd, settings.effect_wasserstein),
    )
    if len(_PREPARED) > 64:
        _PREPARED.clear()
    _PREPARED[key] = prepared
    return prepared


def test_windows(ref: ModelReference, counts: np.ndarray, settings: DriftSettings,
                 *, details: bool = False, dispersion: np.ndarray | None = None) -> ChannelResults:
    """Run every channel's tests on (W, C, B) counts.

    The same statistics as `stats.ks_statistic`, `stats.chi_square`, `stats.wasserstein` and
    `stats.total_variation` (tests check they agree), fused into a few float32 passes over the
    counts: 10,000 devices x 100 channels x 32 bins is 32 million cells per evaluation.
    `dispersion` is the (W, C) design effect phi of each window (`stats.dispersion_factor`;
    None: independent draws): KS uses n / phi, chi-square X / phi. phi is held to
    [1, `max_design_effect`], and every p-value is non-decreasing in phi: a device that reports more
    dependence can only make its windows less significant (tests check it). For that, which tests a
    channel combines (and Bonferroni over them) is decided on n, not on n / phi.
    """
    prep = prepare(ref, settings)
    counts = np.asarray(counts)
    n = counts[:, 0, :].sum(axis=-1, dtype=np.float64)
    phi = np.ones(counts.shape[:2]) if dispersion is None else np.asarray(dispersion, np.float64)
    phi = np.clip(np.nan_to_num(phi, nan=settings.max_design_effect), 1.0, settings.max_design_effect)
    n_eff = n[:, None] / phi
    n_ref = ref.n.astype(np.float64)
    q = counts * (1.0 / np.maximum(n, 1.0)).astype(np.float32)[:, None, None]
    q = q.astype(np.float32, copy=False)
    tvd = np.zeros(q.shape[:2])
    if prep.class_idx.size:
        tvd[:, prep.class_idx] = 0.5 * np.abs(q[:, prep.class_idx] - prep.fractions[prep.class_idx]).sum(axis=-1)
    gap = np.cumsum(q, axis=-1)
    gap -= prep.cdf
    np.abs(gap, out=gap)
    ks = gap.max(axis=-1).astype(np.float64)
    w = np.einsum("wcb,cb->wc", gap, prep.w1_weights).astype(np.float64)
    del gap
    ks_p = stats.ks_pvalue(ks, n_ref[None, :], n_eff)
    # Chi-square, closed form for 2 x B: N n sum (p - q)^2 / (R + C).
    q -= prep.fractions
    np.square(q, out=q)
    q /= counts + prep.chi_denominator_floor
    chi2 = q.sum(axis=-1).astype(np.float64) * (n_ref[None, :] * n[:, None])
    del q
    df = np.broadcast_to(prep.ref_bins_used - 1, chi2.shape).copy()
    if prep.empty_ref_bins.any():  # bins only the window hit add a degree of freedom
        df += ((counts > 0) & prep.empty_ref_bins).sum(axis=-1)
    valid_at_n = (n[:, None] >= prep.chi_min_n[None, :]) & (df > 0) & (n[:, None] > 0)
    chi2_valid = valid_at_n & (n_eff >= prep.chi_min_n[None, :])
    asymptotic_p = special.chdtrc(np.maximum(df, 1), chi2 / phi)
    chi2_p = np.where(chi2_valid, asymptotic_p, 1.0)
    is_class = ref.is_class
    # Class counts chi-square's approximation does not fit get a simulated p-value; where it fits at n
    # but not at n / phi, the larger of the two, so that a larger phi never lowers p.
    _simulated_class_pvalues(ref, counts, n, chi2 / phi, chi2_valid, chi2_p,
                             np.where(valid_at_n, asymptotic_p, 0.0))
    # Numeric: KS and chi-square, Bonferroni over the two (chi-square counts only when valid at n).
    numeric_p = np.where(valid_at_n, np.minimum(2.0 * np.minimum(ks_p, chi2_p), 1.0), ks_p)
    p_channel = np.where(is_class[None, :], chi2_p, numeric_p)
    # Untestable channels (fewer than 2 reference bins) are neither tested nor counted.
    testable = ref.testable
    p_channel = np.where(testable[None, :], p_channel, 1.0)
    p_adjusted = stats.bonferroni(p_channel, max(int(testable.sum()), 1))
    effect = np.where(is_class[None, :], tvd, w)
    result = ChannelResults(n, ks, ks_p, chi2, chi2_p, chi2_valid, w, tvd, p_channel, p_adjusted, effect,
                            (effect >= prep.thresholds[None, :]) & testable[None, :], dispersion=phi)
    if details:
        result.psi = stats.psi(ref.counts, counts, ref.bins[None, :])
        result.ks_bound = stats.ks_binning_bound(ref.counts, counts)
    return result


def _simulated_class_pvalues(ref: ModelReference, counts: np.ndarray, n: np.ndarray, statistic: np.ndarray,
                             valid: np.ndarray, p: np.ndarray, floor: np.ndarray) -> None:
    """Class channels where chi-square's approximation fails get a Monte-Carlo p-value (in place in `p`),
    at least `floor`. Without it such windows got p = 1: a small window could never flag a changed class mix.
    """
    for c in np.nonzero(ref.is_class & ref.testable)[0]:
        rows = np.nonzero(~valid[:, c] & (n > 0))[0]
        if not rows.size:
            continue
        bins = int(ref.bins[c])
        for size in np.unique(n[rows]):
            same = rows[n[rows] == size]
            simulated = stats.simulated_chi_square_pvalue(ref.counts[c, :bins], int(size), statistic[same, c])
            p[same, c] = np.maximum(simulated, floor[same, c])


@dataclass
class Evaluation:
    model: str
    evaluated_at: float
    cutoff: float  # BH step-up cutoff across device windows (0: nothing discovered)
    fleet_rows: list[tuple[Any, ...]] = field(default_factory=list)
    device_rows: list[tuple[Any, ...]] = field(default_factory=list)
    fleet_flags: list[bool] = field(default_factory=list)  # last m tested fleet buckets, oldest first
    fleet_alert: bool = False
    fleet_channels: list[str] = field(default_factory=list)
    device_alerts: dict[str, list[str]] = field(default_factory=dict)  # device -> drifted channels
    fleet_support: list[str] = field(default_factory=list)  # devices whose data carry the fleet's flags
    tested_device_windows: int = 0
    untested_small_windows: int = 0
    seconds: float = 0.0

    def detail(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff,
            "fleet_flags": self.fleet_flags,
            "fleet_alert": self.fleet_alert,
            "fleet_channels": self.fleet_channels,
            "device_alerts": self.device_alerts,
            "fleet_support": self.fleet_support,
            "tested_device_windows": self.tested_device_windows,
            "untested_small_windows": self.untested_small_windows,
            "seconds": self.seconds,
        }


def k_of_m(flags: list[bool], k: int, m: int) -> bool:
    return sum(flags[-m:]) >= k


def _fleet_rows(ref: ModelReference, bucket: float, r: ChannelResults, i: int,
                drifted: np.ndarray) -> list[tuple[Any, ...]]:
    rows = []
    for c, name in enumerate(ref.channel_names):
        is_class = ref.kinds[c] == "class"
        psi_value = None if r.psi is None or not np.isfinite(r.psi[i, c]) else float(r.psi[i, c])
        detail = {
            "ks_p": float(r.ks_p[i, c]), "chi2": float(r.chi2[i, c]), "chi2_p": float(r.chi2_p[i, c]),
            "chi2_valid": bool(r.chi2_valid[i, c]), "wasserstein_sd": float(r.wasserstein[i, c]),
            "tvd": float(r.tvd[i, c]), "psi": psi_value, "psi_band": stats.psi_band(psi_value),
            "p_raw": float(r.p_channel[i, c]),
            "ks_binning_bound": None if r.ks_bound is None else float(r.ks_bound[i, c]),
            "effect_name": "tvd" if is_class else "wasserstein_sd",
            "dispersion": None if r.dispersion is None else float(r.dispersion[i, c]),
            "untestable": ref.untestable.get(name),
        }
        rows.append((ref.sha256, bucket, name, int(r.n[i]), _test_name(ref, r, i, c),
                     float(r.chi2[i, c] if is_class else r.ks[i, c]), float(r.p_adjusted[i, c]),
                     float(r.effect[i, c]), int(drifted[i, c]), _json(detail)))
    return rows


def _test_name(ref: ModelReference, r: ChannelResults, i: int, c: int) -> str:
    if not ref.testable[c]:
        return "untestable"
    if ref.kinds[c] == "class":
        return "chi2" if r.chi2_valid[i, c] else "chi2 (simulated)"
    return "ks+chi2"


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)


def evaluate_counts(ref: ModelReference, devices: np.ndarray, starts: np.ndarray, flat_counts: np.ndarray,
                    settings: DriftSettings, now: float | None = None,
                    fleet: tuple[Any, ...] | None = None, *,
                    dispersion: np.ndarray | None = None, fleet_devices: np.ndarray | None = None) -> Evaluation:
    """Fleet and per-device decisions from stored windows (arrays, one entry per window).

    `flat_counts` is (W, sum(bins)) as stored; windows must be sorted by start time. `fleet`
    optionally gives other (starts, flat counts[, dispersion]) for the fleet level, with
    `fleet_devices` naming their devices (without it each window counts as a device of its own); by
    default it pools the same windows the device level tests. `dispersion` is (W, C, 4), the agent's
    dispersion signal per channel (X, df, S, k; NaN where a window has none; None: no window has it), with
    the design effect of exact repeats as a fifth field where windows report it (`window_design_effect`).
    """
    t0 = time.perf_counter()
    ev = Evaluation(model=ref.sha256, evaluated_at=time.time() if now is None else now, cutoff=0.0)
    f_devices: np.ndarray | None = devices
    if fleet is None:
        f_starts, f_flat, f_disp = starts, flat_counts, dispersion
    else:
        f_starts, f_flat = fleet[0], fleet[1]
        f_disp = fleet[2] if len(fleet) > 2 else None
        f_devices = fleet_devices
    if f_devices is None:  # each window a voice of its own
        f_devices = np.arange(len(f_starts)).astype(str)
    _evaluate_fleet(ev, ref, np.asarray(f_devices), f_starts, f_flat, settings, f_disp)
    _evaluate_devices(ev, ref, devices, starts, flat_counts, settings, dispersion)
    ev.seconds = time.perf_counter() - t0
    return ev


def window_design_effect(dispersion: np.ndarray | None, windows: int, channels: int,
                         settings: DriftSettings) -> np.ndarray:
    """(W, C) design effect phi of each window, held to [1, `max_design_effect`].

    `dispersion` is (W, C, 4) (X, df, S, k; `dispersion_trailer.window_phi`) or (W, C, 5) with the
    design effect of exact repeats (n / n_eff) last: phi is the larger of the two, which see the
    same dependence from two sides (repeats in a row, repeats in any order). NaN: not reported.
    """
    if dispersion is None:
        return np.ones((windows, channels))
    phi = disp.window_phi(dispersion[..., : disp.FIELDS])
    if dispersion.shape[-1] > disp.FIELDS:
        phi = np.maximum(phi, np.nan_to_num(dispersion[..., disp.FIELDS], nan=1.0))
    return np.asarray(np.clip(phi, 1.0, settings.max_design_effect))


def device_scale(ref: ModelReference, devices: np.ndarray, starts: np.ndarray, flat_counts: np.ndarray,
                 settings: DriftSettings) -> np.ndarray:
    """(W,) factor <= 1 per window so that, within a fleet bucket, a device counts at most
    `max_device_weight` x the (lower) median device's n.

    The pooled test weighs a device by its n, which the device itself reports: without a cap one
    device claiming a huge n speaks for the whole fleet and raises a fleet-wide alert alone. The
    lower median, so that of two devices the honest one sets the cap.
    """
    factor = settings.max_device_weight
    if factor <= 0 or len(starts) == 0:
        return np.ones(len(starts))
    n = flat_counts[:, : int(ref.bins[0])].sum(axis=1).astype(np.float64)
    bucket = np.floor(starts / settings.fleet_window_seconds)
    _, device_id = np.unique(np.asarray(devices).astype(str), return_inverse=True)
    _, pair = np.unique(np.stack([bucket, device_id.astype(np.float64)], axis=1), axis=0, return_inverse=True)
    pair = pair.reshape(-1)
    pair_n = np.bincount(pair, weights=n)
    pair_bucket = np.zeros(len(pair_n))
    pair_bucket[pair] = bucket
    cap = np.empty(len(pair_n))
    for b in np.unique(pair_bucket):
        sel = pair_bucket == b
        cap[sel] = factor * np.sort(pair_n[sel])[(int(sel.sum()) - 1) // 2]
    scale: np.ndarray = np.minimum(1.0, cap / np.maximum(pair_n, 1.0))[pair]
    return scale


def cap_device_weight(ref: ModelReference, devices: np.ndarray, starts: np.ndarray, flat_counts: np.ndarray,
                      settings: DriftSettings) -> np.ndarray:
    """The windows' counts scaled by `device_scale` (float64 when scaled; unchanged when no device is over)."""
    scale = device_scale(ref, devices, starts, flat_counts, settings)
    if (scale >= 1.0).all():
        return flat_counts
    return flat_counts * scale[:, None]


def _evaluate_fleet(ev: Evaluation, ref: ModelReference, devices: np.ndarray, starts: np.ndarray,
                    flat_counts: np.ndarray, settings: DriftSettings, dispersion: np.ndarray | None = None) -> None:
    """Fleet level: pool the windows of each time bucket; test the last m buckets with enough data.

    What one device can put into a bucket is bounded: its n (`device_scale`) and its design effect
    (`window_design_effect`). The pooled design effect is that of a sum of independent windows, sum of
    scale^2 n phi over sum of scale n. A channel of a bucket is flagged only when the pooled test flags
    it and still does with any one device left out: no single device, whatever it sends, raises a fleet
    alert that the others do not support (its own device-level test still sees it).
    """
    w_total = len(starts)
    scale = device_scale(ref, devices, starts, flat_counts, settings)
    weighted = flat_counts if (scale >= 1.0).all() else flat_counts * scale[:, None]
    n_scaled = weighted[:, : int(ref.bins[0])].sum(axis=1).astype(np.float64) if w_total else np.zeros(0)
    variance = (scale * n_scaled)[:, None] * window_design_effect(dispersion, w_total, len(ref.channel_names),
                                                                  settings)
    buckets = np.floor(starts / settings.fleet_window_seconds) * settings.fleet_window_seconds
    bucket_ids, inverse = np.unique(buckets, return_inverse=True)
    inverse = inverse.reshape(-1)
    pooled = np.zeros((len(bucket_ids), weighted.shape[1]), dtype=np.result_type(weighted.dtype, np.int64))
    pooled_var = np.zeros((len(bucket_ids), variance.shape[1]))
    if w_total and np.all(np.diff(starts) >= 0):  # sorted by start: each bucket is one contiguous block
        bounds = np.r_[np.searchsorted(buckets, bucket_ids), w_total]
        for b in range(len(bucket_ids)):
            pooled[b] = weighted[bounds[b] : bounds[b + 1]].sum(axis=0)
            pooled_var[b] = variance[bounds[b] : bounds[b + 1]].sum(axis=0)
    else:
        np.add.at(pooled, inverse, weighted)
        np.add.at(pooled_var, inverse, variance)
    bucket_n = pooled[:, : int(ref.bins[0])].sum(axis=1) if len(bucket_ids) else np.zeros(0)
    tested = np.nonzero(bucket_n >= settings.min_n)[0][-settings.m :]
    if not tested.size:
        return
    phi = pooled_var[tested] / np.maximum(bucket_n[tested], 1e-300)[:, None]
    r = test_windows(ref, ref.unflatten(pooled[tested], pooled.dtype.type), settings, details=True, dispersion=phi)
    drifted = (r.p_adjusted <= settings.alpha) & r.effect_ok
    support: set[str] = set()
    for i, b in enumerate(tested):
        if drifted[i].any():
            rows = np.nonzero(inverse == b)[0]
            keep, carriers = _survives_leaving_one_out(ref, settings, devices[rows], weighted[rows], variance[rows],
                                                       pooled[b], pooled_var[b], r.p_adjusted[i])
            drifted[i] &= keep
            if keep.any():
                support.update(carriers)
    ev.fleet_support = sorted(support)
    for i, b in enumerate(tested):
        ev.fleet_rows += _fleet_rows(ref, float(bucket_ids[b]), r, i, drifted)
    ev.fleet_flags = [bool(x) for x in drifted.any(axis=1)]
    ev.fleet_alert = k_of_m(ev.fleet_flags, settings.k, settings.m)
    if ev.fleet_alert:
        hit = drifted.any(axis=0)
        ev.fleet_channels = [ref.channel_names[c] for c in np.nonzero(hit)[0]]


def _survives_leaving_one_out(ref: ModelReference, settings: DriftSettings, devices: np.ndarray,
                              counts: np.ndarray, variance: np.ndarray, pooled: np.ndarray,
                              pooled_var: np.ndarray, pooled_p: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(C,) channels the bucket's pool still flags with each one of its devices left out, and the
    devices that carry the flags (leaving one out makes the flagged channels less significant).

    Only run for a bucket the pooled test flagged (rare), so its cost (one test per device) is paid
    during drift, not every evaluation. A bucket of one device never survives: a fleet alert needs
    the support of at least two devices.
    """
    names, owner = np.unique(devices.astype(str), return_inverse=True)
    owner = owner.reshape(-1)
    if len(names) < 2:
        return np.zeros(len(ref.channel_names), dtype=bool), []
    # Each device's rows summed: rows sorted by device, one reduceat (np.add.at was most of the cost).
    order = np.argsort(owner, kind="stable")
    first = np.searchsorted(owner[order], np.arange(len(names)))
    own_all = np.add.reduceat(np.asarray(counts, dtype=np.float64)[order], first, axis=0)
    own_var_all = np.add.reduceat(variance[order], first, axis=0)
    keep = np.ones(len(ref.channel_names), dtype=bool)
    weakened = np.zeros((len(names), len(ref.channel_names)), dtype=bool)
    for lo in range(0, len(names), CHUNK):
        own, own_var = own_all[lo : lo + CHUNK], own_var_all[lo : lo + CHUNK]
        rest = np.maximum(pooled[None, :] - own, 0.0)
        rest_n = rest[:, : int(ref.bins[0])].sum(axis=1)
        phi = (pooled_var[None, :] - own_var) / np.maximum(rest_n, 1e-300)[:, None]
        r = test_windows(ref, ref.unflatten(rest, np.float32), settings, dispersion=phi)
        flagged = (r.p_adjusted <= settings.alpha) & r.effect_ok & (rest_n >= settings.min_n)[:, None]
        keep &= flagged.all(axis=0)
        weakened[lo : lo + len(own)] = r.p_adjusted > pooled_p[None, :]
    return keep, [str(d) for d in names[(weakened & keep[None, :]).any(axis=1)]]


def _evaluate_devices(ev: Evaluation, ref: ModelReference, devices: np.ndarray, starts: np.ndarray,
                      flat_counts: np.ndarray, settings: DriftSettings, dispersion: np.ndarray | None = None) -> None:
    """Device level: each device's last m windows with enough inferences, BH across all of them."""
    w_total = len(starts)
    n_window = flat_counts[:, : int(ref.bins[0])].sum(axis=1) if w_total else np.zeros(0, dtype=np.int64)
    big = n_window >= settings.min_n
    ev.untested_small_windows = int((~big).sum())
    order = np.lexsort((starts, devices))
    order = order[big[order]]
    dev_sorted = devices[order]
    # Keep the last m per device: position from the end within each device's run.
    if order.size:
        run_end = np.r_[np.nonzero(dev_sorted[1:] != dev_sorted[:-1])[0], len(order) - 1]
        run_id = np.r_[0, np.cumsum(dev_sorted[1:] != dev_sorted[:-1])]
        from_end = run_end[run_id] - np.arange(len(order))
        order = order[from_end < settings.m]
    ev.tested_device_windows = int(order.size)
    p_dev = np.ones(order.size)
    p_adj_chunks: list[np.ndarray] = []
    eff_chunks: list[np.ndarray] = []
    ok_chunks: list[np.ndarray] = []
    for lo in range(0, order.size, CHUNK):
        idx = order[lo : lo + CHUNK]
        phi = None if dispersion is None else window_design_effect(dispersion[idx], len(idx), 0, settings)
        r = test_windows(ref, ref.unflatten(flat_counts[idx], np.float32), settings, dispersion=phi)
        p_dev[lo : lo + len(idx)] = r.p_adjusted.min(axis=1)
        # Keep only what the decision needs, as float32, to bound memory at large fleets.
        p_adj_chunks.append(r.p_adjusted)
        eff_chunks.append(r.effect.max(axis=1))
        ok_chunks.append(r.effect_ok)
    q_dev, ev.cutoff = stats.benjamini_hochberg(p_dev, settings.alpha)
    flags_by_device: dict[str, list[bool]] = {}
    channels_by_device: dict[str, set[str]] = {}
    for lo, p_adj, eff, ok in zip(range(0, order.size, CHUNK), p_adj_chunks, eff_chunks, ok_chunks, strict=True):
        drifted = (p_adj <= ev.cutoff) & ok
        any_drift = drifted.any(axis=1).tolist()
        idx = order[lo : lo + len(p_adj)]
        for j, (device, start, nw, p, q, e) in enumerate(zip(
                devices[idx].tolist(), starts[idx].tolist(), n_window[idx].tolist(),
                p_dev[lo : lo + len(p_adj)].tolist(), q_dev[lo : lo + len(p_adj)].tolist(), eff.tolist(),
                strict=True)):
            flags_by_device.setdefault(device, []).append(any_drift[j])
            names = "[]"
            if any_drift[j]:
                drifted_names = [ref.channel_names[c] for c in np.nonzero(drifted[j])[0]]
                channels_by_device.setdefault(device, set()).update(drifted_names)
                names = _json(drifted_names)
            ev.device_rows.append((ref.sha256, device, start, nw, p, q, e, int(any_drift[j]), names))
    for device, flags in flags_by_device.items():
        if k_of_m(flags, settings.k, settings.m):
            ev.device_alerts[device] = sorted(channels_by_device.get(device, set()))


def load_windows(storage: Storage, ref: ModelReference, since: float,
                 device: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(devices, starts, flat counts) of stored windows, oldest first."""
    return _arrays(ref, storage.windows(ref.sha256, since, device))[:3]


def _arrays(ref: ModelReference, rows: list[tuple[Any, ...]]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(devices, starts, flat counts, dispersion (W, C, 4), or (W, C, 5) with the design effect of repeats
    last, or None when no window carries either)."""
    total = int(ref.bins.sum())
    if not rows:
        return np.array([], dtype=object), np.zeros(0), np.zeros((0, total), dtype=np.int64), None
    devices = np.array([r[0] for r in rows], dtype=object)
    starts = np.array([r[1] for r in rows], dtype=np.float64)
    blobs, repeats = disp.split_repeats([bytes(r[4]) for r in rows], total)
    blobs, dispersion = disp.split(blobs, total, len(ref.channel_names))
    flat = decode_counts(blobs, total)
    if not np.isnan(repeats).all():
        column = np.broadcast_to(repeats[:, None, None], (*dispersion.shape[:2], 1))
        return devices, starts, flat, np.concatenate([dispersion, column], axis=-1)
    return devices, starts, flat, None if np.isnan(dispersion).all() else dispersion


def evaluate_model(storage: Storage, ref: ModelReference, settings: DriftSettings,
                   now: float | None = None) -> Evaluation:
    """Evaluate one model version from the database and store the results."""
    now = time.time() if now is None else now
    since = now - settings.lookback_seconds
    # Fleet: the last FLEET_BUCKETS_READ x m bucket periods (room for buckets below min_n).
    span = settings.fleet_window_seconds
    fleet_since = max(since, (np.floor(now / span) - FLEET_BUCKETS_READ * settings.m + 1) * span)
    fleet_devices, fleet_starts, fleet_flat, fleet_disp = _arrays(ref, storage.windows(ref.sha256, fleet_since))
    devices, starts, flat, dispersion = _arrays(
        ref, storage.latest_windows(ref.sha256, since, settings.m, settings.min_n))
    ev = evaluate_counts(ref, devices, starts, flat, settings, now, fleet=(fleet_starts, fleet_flat, fleet_disp),
                         dispersion=dispersion, fleet_devices=fleet_devices)
    ev.untested_small_windows = storage.small_window_count(ref.sha256, since, settings.min_n)
    storage.save_evaluation(ref.sha256, ev.evaluated_at, ev.detail(), ev.fleet_rows, ev.device_rows)
    return ev


def device_channels(storage: Storage, ref: ModelReference, device: str, settings: DriftSettings,
                    cutoff: float, now: float | None = None) -> list[dict[str, Any]]:
    """Per-channel results of one device's last m tested windows, flagged with the fleet's BH cutoff."""
    now = time.time() if now is None else now
    _, starts, flat, dispersion = _arrays(ref, storage.windows(ref.sha256, now - settings.lookback_seconds, device))
    n = flat[:, : int(ref.bins[0])].sum(axis=1) if len(starts) else np.zeros(0)
    keep = np.nonzero(n >= settings.min_n)[0][-settings.m :]
    if not keep.size:
        return []
    phi = None if dispersion is None else window_design_effect(dispersion[keep], len(keep), 0, settings)
    r = test_windows(ref, ref.unflatten(flat[keep]), settings, details=True, dispersion=phi)
    drifted = (r.p_adjusted <= cutoff) & r.effect_ok
    out = []
    for i, w in enumerate(keep):
        for c, name in enumerate(ref.channel_names):
            is_class = ref.kinds[c] == "class"
            out.append({
                "model": ref.sha256, "scope": "device", "device": device, "window_start": float(starts[w]),
                "n": int(r.n[i]), "channel": name, "test": _test_name(ref, r, i, c),
                "statistic": float(r.chi2[i, c] if is_class else r.ks[i, c]), "p_value": float(r.p_adjusted[i, c]),
                "effect": float(r.effect[i, c]), "effect_name": "tvd" if is_class else "wasserstein_sd",
                "drifted": bool(drifted[i, c]),
            })
    return out


def pooled_histogram(storage: Storage, ref: ModelReference, channel: str, since: float,
                     device: str | None = None) -> dict[str, Any]:
    """Reference vs current fractions of one channel (current = windows since `since`, pooled)."""
    c = ref.channel_names.index(channel)
    _, _, flat = load_windows(storage, ref, since, device)
    offset = int(ref.bins[:c].sum())
    bins = int(ref.bins[c])
    current = flat[:, offset : offset + bins].sum(axis=0) if len(flat) else np.zeros(bins, dtype=np.int64)
    ref_counts = ref.counts[c, :bins]
    return {
        "channel": channel,
        "kind": ref.kinds[c],
        "edges": [float(e) for e in ref.edges[c, : bins + 1]],
        "reference": (ref_counts / max(int(ref_counts.sum()), 1)).tolist(),
        "current": (current / max(int(current.sum()), 1)).tolist(),
        "n_reference": int(ref_counts.sum()),
        "n_current": int(current.sum()),
    }
