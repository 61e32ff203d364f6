"""The canary decision: does the new bundle behave on the canary devices like the old one on the rest?

Canary devices serve the new bundle; control devices are the other target devices still serving
their old one, over the same period. Once every canary device has sent `windows` windows of the new
model (or failed to install it), the figures are compared:

- install: a canary that reported `failed` (download, verification or self-test) fails the canary.
- requests: the share of failed requests on the canaries (status `serving` block) may exceed the
  control devices' share by at most `max_failed_rate_increase`.
- latency: the canaries' median p95 may be at most `max_latency_ratio` x the control devices' median p95
  (+ `latency_slack_ms`), once each side served `min_latency_requests` requests.
- predicted_class: the predicted-class counts of the canaries' windows under the new bundle against the
  old version's: the same canary devices' windows from before the swap when they have some (devices
  see different class mixes, so comparing a device with itself is not confounded by which devices
  happened to be drawn), else the control devices' windows. Chi-square test of homogeneity
  (`stats.chi_square`, the drift machinery's test); fails when significant at `alpha` AND the total
  variation distance is at least the drift config's `effect_class_tvd` (so a huge sample cannot fail a
  canary on a negligible difference).
- input_drift: the canaries' pooled input channels against the NEW bundle's reference, with the drift
  tests (`drift.test_windows`, Bonferroni over the channels): the bundle was calibrated for other data.
- accuracy: where labels arrived for both sides (at least `min_labels` each), the canaries' labelled
  accuracy may be at most `concept.max_accuracy_drop` below the control devices'.

A figure without enough data on one side is reported with `"ok": null` and does not decide; but with
control devices the decision waits until the predicted-class comparison has data on both sides, so a
canary is never passed without its model's behaviour having been compared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_kit.fleet import drift, stats
from edge_kit.fleet.reference_index import ModelReference
from edge_kit.fleet.settings import FleetSettings
from edge_kit.fleet.storage import Storage

CONTROL_LOOKBACK_SECONDS = 3600.0  # control windows from this long before the deployment onward


@dataclass(frozen=True)
class CanaryThresholds:
    max_failed_rate_increase: float = 0.01
    max_latency_ratio: float = 2.0
    latency_slack_ms: float = 1.0  # sub-millisecond models jitter by more than 2x at the p95
    min_requests: int = 20  # fewer requests on a side: the failed-request figure does not decide
    # A p95 over fewer requests is its few slowest ones, and a model that just swapped in serves its first
    # (cold) requests slowly: the latency figure waits for this many on each side.
    min_latency_requests: int = 200


@dataclass(frozen=True)
class Side:
    """One side of the comparison: its devices and the model (reference) each of them serves."""

    devices: list[str]
    references: dict[str, ModelReference]  # device -> the reference of the model it serves


def evaluate(storage: Storage, settings: FleetSettings, *, new: ModelReference | None, created_at: float,
             canary: Sequence[str], canary_steps: dict[str, tuple[str | None, str | None]], control: Side,
             canary_before: dict[str, ModelReference] | None = None,
             statuses: dict[str, dict[str, Any]], windows: int,
             thresholds: CanaryThresholds = CanaryThresholds(), now: float | None = None) -> dict[str, Any]:
    """The figures and, once ready, the verdict: {"ready", "passed", "failing": [figure names], "figures"}."""
    now = time.time() if now is None else now
    failed = {d: reason for d, (step, reason) in canary_steps.items() if step == "failed"}
    canary_rows = [] if new is None else [r for r in storage.windows(new.sha256, created_at)
                                          if r[0] in set(canary)]
    per_device = {d: 0 for d in canary}
    for r in canary_rows:
        per_device[r[0]] += 1
    figures: dict[str, dict[str, Any]] = {
        "install": {"canaries": len(canary), "failed": len(failed), "reasons": failed,
                    "installed": sum(1 for s, _ in canary_steps.values() if s == "installed"), "ok": not failed},
    }
    figures["requests"], figures["latency"] = _serving(canary, control.devices, statuses, new, thresholds)
    figures["predicted_class"] = _predicted_class(storage, settings, new, canary_rows, control, created_at,
                                                  canary_before or {})
    figures["input_drift"] = _input_drift(settings, new, canary_rows)
    figures["accuracy"] = _accuracy(storage, settings, new, canary, control, created_at)
    # The model's behaviour must have been compared before a canary can pass: with control devices, the
    # decision also waits for their windows (control devices that just installed the model the canary's
    # bundle replaces have none yet), else a canary with nothing to compare against would pass.
    waiting = []
    if new is None:
        waiting.append("the new bundle's reference (put the bundle in the server's --bundles folder)")
    elif not all(n >= windows for n in per_device.values()):
        waiting.append(f"{windows} windows from every canary")
    elif control.devices and figures["predicted_class"]["ok"] is None:
        waiting.append("enough predictions from canary and control devices for the predicted-class test")
    ready = bool(failed) or not waiting
    failing = [name for name, f in figures.items() if f.get("ok") is False]
    return {"ready": ready, "passed": (not failing) if ready else None, "failing": failing if ready else [],
            "waiting_for": [] if ready else waiting, "windows": per_device, "windows_needed": windows,
            "canary_devices": list(canary), "control_devices": list(control.devices), "figures": figures,
            "evaluated_at": now}


def _serving(canary: Sequence[str], control: Sequence[str], statuses: dict[str, dict[str, Any]],
             new: ModelReference | None, t: CanaryThresholds) -> tuple[dict[str, Any], dict[str, Any]]:
    def side(devices: Sequence[str], want_new: bool) -> tuple[int, int, list[float]]:
        requests = failed = 0
        p95: list[float] = []
        for d in devices:
            status = statuses.get(d) or {}
            model = (status.get("model") or {}).get("sha256")
            if new is not None and (model == new.sha256) != want_new:
                continue  # a status from before the swap describes the other model
            serving = status.get("serving")
            if not isinstance(serving, dict):
                continue
            r, f = serving.get("requests"), serving.get("failed_requests")
            if isinstance(r, int) and isinstance(f, int) and r >= 0 and f >= 0:
                requests, failed = requests + r, failed + f
            lat = (serving.get("latency_ms") or {}).get("p95")
            if isinstance(lat, int | float) and not isinstance(lat, bool) and np.isfinite(lat) and r:
                p95.append(float(lat))
        return requests, failed, p95

    cr, cf, cp = side(canary, True)
    kr, kf, kp = side(control, False)
    requests: dict[str, Any] = {"canary_requests": cr, "canary_failed": cf, "control_requests": kr,
                                "control_failed": kf, "canary_rate": cf / cr if cr else None,
                                "control_rate": kf / kr if kr else None,
                                "max_increase": t.max_failed_rate_increase, "ok": None}
    if cr >= t.min_requests:
        base = kf / kr if kr >= t.min_requests else 0.0
        requests["ok"] = bool(cf / cr <= base + t.max_failed_rate_increase)
    latency: dict[str, Any] = {"canary_p95_ms": float(np.median(cp)) if cp else None,
                               "control_p95_ms": float(np.median(kp)) if kp else None,
                               "max_ratio": t.max_latency_ratio, "ok": None}
    latency["min_requests"] = t.min_latency_requests
    if cp and kp and cr >= t.min_latency_requests and kr >= t.min_latency_requests:
        latency["ratio"] = latency["canary_p95_ms"] / max(latency["control_p95_ms"], 1e-3)
        latency["ok"] = bool(latency["canary_p95_ms"]
                             <= t.max_latency_ratio * latency["control_p95_ms"] + t.latency_slack_ms)
    return requests, latency


def _class_counts(ref: ModelReference, rows: Sequence[tuple[Any, ...]]) -> np.ndarray | None:
    if not rows or not ref.is_class.any():
        return None
    c = int(np.nonzero(ref.is_class)[0][0])
    flat = drift._arrays(ref, list(rows))[2]
    offset, bins = int(ref.bins[:c].sum()), int(ref.bins[c])
    return np.asarray(flat[:, offset: offset + bins].sum(axis=0), dtype=np.int64)


def _old_class_counts(storage: Storage, new: ModelReference, references: dict[str, ModelReference], since: float,
                      before: float | None) -> np.ndarray | None:
    """Predicted-class counts of these devices' windows of the models they served (before `before`, if given)."""
    total: np.ndarray | None = None
    by_model: dict[str, tuple[ModelReference, list[str]]] = {}
    for device, ref in references.items():
        by_model.setdefault(ref.sha256, (ref, []))[1].append(device)
    for ref, devices in by_model.values():
        if ref.labels != new.labels or ref.sha256 == new.sha256:
            continue  # another label set: its predicted classes are not the same categories
        rows = [r for r in storage.windows(ref.sha256, since)
                if r[0] in set(devices) and (before is None or r[1] < before)]
        counts = _class_counts(ref, rows)
        if counts is not None and (total is None or counts.shape == total.shape):
            total = counts if total is None else total + counts
    return total


def _predicted_class(storage: Storage, settings: FleetSettings, new: ModelReference | None,
                     canary_rows: list[tuple[Any, ...]], control: Side, created_at: float,
                     canary_before: dict[str, ModelReference]) -> dict[str, Any]:
    out: dict[str, Any] = {"test": "chi-square (predicted-class counts, new bundle vs old version)",
                           "alpha": settings.drift.alpha, "min_tvd": settings.drift.effect_class_tvd, "ok": None}
    if new is None:
        return out
    canary_counts = _class_counts(new, canary_rows)
    since = created_at - CONTROL_LOOKBACK_SECONDS
    control_counts = _old_class_counts(storage, new, canary_before, since, before=created_at)
    out["control"] = "the canary devices before the swap"
    if control_counts is None or int(control_counts.sum()) == 0:
        control_counts = _old_class_counts(storage, new, control.references, since, before=None)
        out["control"] = "the control devices"
    out["canary_n"] = int(canary_counts.sum()) if canary_counts is not None else 0
    out["control_n"] = int(control_counts.sum()) if control_counts is not None else 0
    if canary_counts is None or control_counts is None or canary_counts.shape != control_counts.shape:
        return out
    stat, p, valid = stats.chi_square(control_counts[None, :], canary_counts[None, :])
    tvd = float(stats.total_variation(control_counts[None, :], canary_counts[None, :])[0])
    out.update({"statistic": float(stat[0]), "p_value": float(p[0]), "tvd": tvd, "valid": bool(valid[0]),
                "canary_fractions": (canary_counts / max(int(canary_counts.sum()), 1)).round(4).tolist(),
                "control_fractions": (control_counts / max(int(control_counts.sum()), 1)).round(4).tolist()})
    if valid[0]:
        out["ok"] = not (p[0] <= settings.drift.alpha and tvd >= settings.drift.effect_class_tvd)
    return out


def _input_drift(settings: FleetSettings, new: ModelReference | None,
                 canary_rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {"test": "drift tests of the canaries' pooled inputs against the new bundle's reference",
                           "alpha": settings.drift.alpha, "ok": None}
    if new is None or not canary_rows:
        return out
    flat = drift._arrays(new, canary_rows)[2].sum(axis=0, keepdims=True)
    r = drift.test_windows(new, new.unflatten(flat), settings.drift)
    inputs = [i for i, name in enumerate(new.channel_names) if name.startswith("in.") and new.testable[i]]
    drifted = [new.channel_names[i] for i in inputs
               if r.p_adjusted[0, i] <= settings.drift.alpha and bool(r.effect_ok[0, i])]
    out.update({"n": int(r.n[0]), "channels": len(inputs), "drifted": drifted,
                "min_p_value": float(min((r.p_adjusted[0, i] for i in inputs), default=1.0))})
    if int(r.n[0]) >= settings.drift.min_n and inputs:
        out["ok"] = not drifted
    return out


def _accuracy(storage: Storage, settings: FleetSettings, new: ModelReference | None, canary: Sequence[str],
              control: Side, created_at: float) -> dict[str, Any]:
    out: dict[str, Any] = {"max_drop": settings.concept.max_accuracy_drop, "min_labels": settings.concept.min_labels,
                           "ok": None}
    if new is None:
        return out

    def tally(refs: dict[str, ModelReference], since: float) -> tuple[int, int]:
        correct = total = 0
        for sha in {r.sha256 for r in refs.values()}:
            k = len(next(r for r in refs.values() if r.sha256 == sha).labels)
            for device, blob in storage.labels(sha, since):
                if device in refs and refs[device].sha256 == sha:
                    m = np.frombuffer(blob, dtype=np.int64)
                    if m.size == k * k:
                        correct += int(np.trace(m.reshape(k, k)))
                        total += int(m.sum())
        return correct, total

    cc, cn = tally({d: new for d in canary}, created_at)
    kc, kn = tally(control.references, created_at - CONTROL_LOOKBACK_SECONDS)
    out.update({"canary_n": cn, "control_n": kn, "canary_accuracy": cc / cn if cn else None,
                "control_accuracy": kc / kn if kn else None})
    if cn >= settings.concept.min_labels and kn >= settings.concept.min_labels:
        out["ok"] = bool(cc / cn >= kc / kn - settings.concept.max_accuracy_drop)
    return out
