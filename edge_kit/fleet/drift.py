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
    None: independent draws): KS uses n / phi, chi-square X / phi.
    """
    prep = prepare(ref, settings)
    counts = np.asarray(counts)
    n = counts[:, 0, :].sum(axis=-1, dtype=np.float64)
    phi = np.ones(counts.shape[:2]) if dispersion is None else np.maximum(np.asarray(dispersion, np.float64), 1.0)
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
    chi2_valid = (n_eff >= prep.chi_min_n[None, :]) & (df > 0) & (n[:, None] > 0)
    chi2_p = np.where(chi2_valid, special.chdtrc(np.maximum(df, 1), chi2 / phi), 1.0)
    is_class = ref.is_class
    _simulated_class_pvalues(ref, counts, n, chi2 / phi, chi2_valid, chi2_p)
    # Numeric: KS and chi-square, Bonferroni over the two (chi-square counts only when valid).
    numeric_p = np.where(chi2_valid, np.minimum(2.0 * np.minimum(ks_p, chi2_p), 1.0), ks_p)
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
                             valid: np.ndarray, p: np.ndarray) -> None:
    """Class channels where chi-square's approximation fails get a Monte-Carlo p-value (in place in `p`).

    Before, such windows got p = 1: a small window could never flag a changed class mix.
    """
    for c in np.nonzero(ref.is_class & ref.testable)[0]:
        rows = np.nonzero(~valid[:, c] & (n > 0))[0]
        if not rows.size:
            continue
        bins = int(ref.bins[c])
        for size in np.unique(n[rows]):
            same = rows[n[rows] == size]
            p[same, c] = stats.simulated_chi_square_pvalue(ref.counts[c, :bins], int(size), statistic[same, c])


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
    `fleet_devices` naming their devices (for the per-device weight cap; without it no cap); by
    default it pools the same windows the device level tests. `dispersion` is (W, C, 4), the agent's
    dispersion signal per channel (X, df, S, k; NaN where a window has none; None: no window has it).
    """
    t0 = time.perf_counter()
    ev = Evaluation(model=ref.sha256, evaluated_at=time.time() if now is None else now, cutoff=0.0)
    fleet_args = fleet if fleet is not None else (starts, flat_counts, dispersion)
    f_devices = fleet_devices if fleet is not None else devices
    f_flat = fleet_args[1] if f_devices is None else cap_device_weight(ref, f_devices, fleet_args[0], fleet_args[1],
                                                                       settings)
    _evaluate_fleet(ev, ref, fleet_args[0], f_flat, settings, fleet_args[2] if len(fleet_args) > 2 else None)
    _evaluate_devices(ev, ref, devices, starts, flat_counts, settings, dispersion)
    ev.seconds = time.perf_counter() - t0
    return ev


def cap_device_weight(ref: ModelReference, devices: np.ndarray, starts: np.ndarray, flat_counts: np.ndarray,
                      settings: DriftSettings) -> np.ndarray:
    """Scale each device's windows so that, within a fleet bucket, it counts at most
    `max_device_weight` x the (lower) median device's n.

    The pooled test weighs a device by its n, which the device itself reports: without a cap one
    device claiming a huge n speaks for the whole fleet and raises a fleet-wide alert alone. The
    lower median, so that of two devices the honest one sets the cap. Rows are returned as float64
    when scaled (the tests take fractional counts); unchanged when no device is over its cap.
    """
    factor = settings.max_device_weight
    if factor <= 0 or len(starts) == 0:
        return flat_counts
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
    scale = np.minimum(1.0, cap / np.maximum(pair_n, 1.0))
    if (scale >= 1.0).all():
        return flat_counts
    return flat_counts * scale[pair][:, None]


def _evaluate_fleet(ev: Evaluation, ref: ModelReference, starts: np.ndarray, flat_counts: np.ndarray,
                    settings: DriftSettings, dispersion: np.ndarray | None = None) -> None:
    """Fleet level: pool the windows of each time bucket; test the last m buckets with enough data."""
    w_total = len(starts)
    buckets = np.floor(starts / settings.fleet_window_seconds) * settings.fleet_window_seconds
    bucket_ids, inverse = np.unique(buckets, return_inverse=True)
    pooled = np.zeros((len(bucket_ids), flat_counts.shape[1]), dtype=np.result_type(flat_counts.dtype, np.int64))
    if w_total and np.all(np.diff(starts) >= 0):  # sorted by start: each bucket is one contiguous block
        bounds = np.r_[np.searchsorted(buckets, bucket_ids), w_total]
        for b in range(len(bucket_ids)):
            pooled[b] = flat_counts[bounds[b] : bounds[b + 1]].sum(axis=0)
    else:
        np.add.at(pooled, inverse, flat_counts)
    bucket_n = pooled[:, : int(ref.bins[0])].sum(axis=1) if len(bucket_ids) else np.zeros(0)
    tested = np.nonzero(bucket_n >= settings.min_n)[0][-settings.m :]
    phi = None
    if dispersion is not None and tested.size:  # X and df add over the pooled windows
        pooled_disp = np.zeros((len(bucket_ids), *dispersion.shape[1:]))
        np.add.at(pooled_disp, inverse, np.nan_to_num(dispersion))
        phi = disp.window_phi(pooled_disp[tested])
    if tested.size:
        r = test_windows(ref, ref.unflatten(pooled[tested], pooled.dtype.type), settings, details=True,
                         dispersion=phi)
        drifted = (r.p_adjusted <= settings.alpha) & r.effect_ok
        for i, b in enumerate(tested):
            ev.fleet_rows += _fleet_rows(ref, float(bucket_ids[b]), r, i, drifted)
        ev.fleet_flags = [bool(x) for x in drifted.any(axis=1)]
        ev.fleet_alert = k_of_m(ev.fleet_flags, settings.k, settings.m)
        if ev.fleet_alert:
            hit = drifted.any(axis=0)
            ev.fleet_channels = [ref.channel_names[c] for c in np.nonzero(hit)[0]]



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
        phi = None if dispersion is None else disp.window_phi(dispersion[idx])
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
    """(devices, starts, flat counts, dispersion (W, C, 4) or None when no window carries it)."""
    total = int(ref.bins.sum())
    if not rows:
        return np.array([], dtype=object), np.zeros(0), np.zeros((0, total), dtype=np.int64), None
    devices = np.array([r[0] for r in rows], dtype=object)
    starts = np.array([r[1] for r in rows], dtype=np.float64)
    blobs, dispersion = disp.split([bytes(r[4]) for r in rows], total, len(ref.channel_names))
    flat = decode_counts(blobs, total)
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
    phi = None if dispersion is None else disp.window_phi(dispersion[keep])
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
