"""Drift evaluation speed and statistical quality of the binned tests.

1. Time to evaluate 10,000 devices x 100 channels (32 bins each): in memory, and from SQLite.
2. Power of the binned KS (and of the KS + chi-square channel test the service uses) against the
   raw-sample KS (scipy.stats.ks_2samp) for shifts of 0.25 and 0.5 reference sd at n = 50..1000.
3. False alarm rate with no drift (Gaussian world, 100 channels).
4. The Failing Loudly style suite on digits (benchmarks/drift_suite.py): 13 shifts and none, window
   sizes 50-500, i.i.d. and correlated streams, power and false alarms per cell for edge-kit and
   raw-sample KS (Evidently and alibi-detect only when importable), into results/drift_suite.json.

    python benchmarks/bench_drift.py [--quick] [--suite-only]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_result  # noqa: E402
from benchmarks.drift_suite import run_suite  # noqa: E402
from device_agent.monitoring.channels import MonitorPlan  # noqa: E402
from device_agent.monitoring.reference import bin_counts, build_reference, quantile_edges  # noqa: E402
from edge_kit.fleet import drift, stats  # noqa: E402
from edge_kit.fleet.reference_index import ModelReference  # noqa: E402
from edge_kit.fleet.settings import DriftSettings  # noqa: E402
from edge_kit.fleet.storage import Storage, WindowRow, encode_counts  # noqa: E402


def wide_reference(channels: int = 100, bins: int = 32) -> ModelReference:
    """A model with 96 numeric inputs + 2 class probabilities + confidence + predicted class = 100 channels."""
    features = channels - 4
    plan = MonitorPlan.for_features([f"x{i}" for i in range(features)], ["a", "b"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, features))
    w = rng.normal(size=(features, 2)) / np.sqrt(features)
    ref = build_reference(plan, plan.values(x, x @ w), bins)
    return ModelReference.from_reference(ref, sha256="b" * 64, name="wide", version="1", labels=["a", "b"])


def synthetic_windows(ref: ModelReference, devices: int, n: int, drifted: int, rng: np.random.Generator
                      ) -> np.ndarray:
    """(devices, sum(bins)) counts drawn from the reference's bin probabilities.

    The first `drifted` devices have their first input's bin probabilities tilted (x0.5 .. x1.5 across bins).
    """
    probs = ref.counts / ref.counts.sum(axis=1, keepdims=True)
    out = np.empty((devices, int(ref.bins.sum())), dtype=np.int64)
    flat_probs = np.concatenate([probs[c, : ref.bins[c]] for c in range(len(ref.bins))])
    offsets = np.r_[0, np.cumsum(ref.bins)]
    for c in range(len(ref.bins)):
        p = flat_probs[offsets[c] : offsets[c + 1]]
        out[:, offsets[c] : offsets[c + 1]] = rng.multinomial(n, p / p.sum(), size=devices)
    if drifted:
        skew = flat_probs[offsets[0] : offsets[1]] * np.linspace(0.5, 1.5, ref.bins[0])
        out[:drifted, offsets[0] : offsets[1]] = rng.multinomial(n, skew / skew.sum(), size=drifted)
    return out


def bench_evaluation(quick: bool) -> list[dict]:
    ref = wide_reference()
    rng = np.random.default_rng(1)
    devices = 2000 if quick else 10_000
    flat = synthetic_windows(ref, devices, 500, drifted=50, rng=rng)
    names = np.array([f"dev{i:05d}" for i in range(devices)], dtype=object)
    starts = 1.8e9 + np.arange(devices) * 1e-3
    settings = DriftSettings()
    rows = []
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ev = drift.evaluate_counts(ref, names, starts, flat, settings)
        times.append(time.perf_counter() - t0)
    flagged = sum(r[7] for r in ev.device_rows)
    rows.append({"what": f"evaluate {devices} devices x {len(ref.bins)} channels (in memory)",
                 "seconds_min": min(times), "seconds_median": float(np.median(times)),
                 "device_windows_flagged": flagged, "fleet_flag": ev.fleet_flags})
    with tempfile.TemporaryDirectory() as tmp:
        storage = Storage(f"sqlite:///{tmp}/fleet.db")
        now = time.time()
        batch = [WindowRow(str(names[i]), ref.sha256, now - 100 + i * 1e-3, now - 50, 0, 500, "bench", "wide", "1",
                           now, encode_counts(flat[i]), None) for i in range(devices)]
        for lo in range(0, devices, 1000):
            storage.ingest(batch[lo : lo + 1000], [], {})
        t0 = time.perf_counter()
        ev = drift.evaluate_model(storage, ref, settings, now)
        total = time.perf_counter() - t0
        storage.close()
    rows.append({"what": f"evaluate {devices} devices x {len(ref.bins)} channels from SQLite, results stored",
                 "seconds_min": total, "seconds_median": total,
                 "device_windows_flagged": sum(r[7] for r in ev.device_rows), "fleet_flag": ev.fleet_flags})
    return rows


def bench_power(quick: bool) -> list[dict]:
    trials = 200 if quick else 1000
    alpha = 0.05
    rng = np.random.default_rng(2)
    ref_raw = rng.normal(size=5000)
    edges = quantile_edges(ref_raw, 32)
    ref_counts = bin_counts(ref_raw, edges)[None, :]
    rows = []
    for shift in (0.25, 0.5):
        for n in (50, 100, 200, 500, 1000):
            cur = rng.normal(shift, 1.0, size=(trials, n))
            raw_p = np.array([sps.ks_2samp(ref_raw, c).pvalue for c in cur])
            counts = np.stack([bin_counts(c, edges) for c in cur])[:, None, :]
            d = stats.ks_statistic(ref_counts, counts)[:, 0]
            ks_p = stats.ks_pvalue(d, 5000, n)
            _, chi_p, valid = stats.chi_square(ref_counts, counts)
            combined = np.where(valid[:, 0], np.minimum(2 * np.minimum(ks_p, chi_p[:, 0]), 1.0), ks_p)
            raw_power = float((raw_p <= alpha).mean())
            binned = float((ks_p <= alpha).mean())
            rows.append({"shift_sd": shift, "n": n, "raw_ks_power": raw_power, "binned_ks_power": binned,
                         "binned_ratio": binned / raw_power if raw_power else None,
                         "service_test_power": float((combined <= alpha).mean())})
    return rows


def bench_false_alarms(quick: bool) -> list[dict]:
    """Whole-model decision (100 channels, Bonferroni, BH-free) under no drift, Gaussian world."""
    ref = wide_reference()
    rng = np.random.default_rng(4)
    windows = 500 if quick else 2000
    rows = []
    for alpha in (0.01, 0.05):
        settings = DriftSettings(alpha=alpha, effect_wasserstein=0.0, effect_class_tvd=0.0)
        for n in (100, 1000):
            flat = synthetic_windows(ref, windows, n, drifted=0, rng=rng)
            r = drift.test_windows(ref, ref.unflatten(flat), settings)
            rate = float((r.p_adjusted <= alpha).any(axis=1).mean())
            rows.append({"world": "gaussian (100 channels)", "alpha": alpha, "n": n, "windows": windows,
                         "false_alarm_rate": rate, "raw_ks_false_alarm_rate": None})
    return rows


def bench_suite(quick: bool) -> tuple[list[dict], dict]:
    if quick:
        return run_suite(trials=8, sizes=(50, 200), streams=("iid", "repeat", "resample"), null_trials=30)
    return run_suite(trials=30, sizes=(50, 200, 500), streams=("iid", "repeat", "ar1", "resample"), null_trials=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--suite-only", action="store_true", help="only the digits suite (drift_suite.json)")
    args = parser.parse_args()
    conditions = "2-core shared VM, other engineers' jobs running concurrently"
    if not args.suite_only:
        evaluation = bench_evaluation(args.quick)
        print_table(evaluation)
        power = bench_power(args.quick)
        print_table(power)
        far = bench_false_alarms(args.quick)
        print_table(far)
        out = write_result("fleet_drift", {"evaluation": evaluation, "power_gaussian_shift": power,
                                           "false_alarms_gaussian": far}, quick=args.quick, conditions=conditions)
        print(f"wrote {out}")
    rows, summary = bench_suite(args.quick)
    print_table(rows)
    print(summary)
    out = write_result("drift_suite", {"summary": summary, "cells": rows}, quick=args.quick, conditions=conditions)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
