"""Concept drift: accuracy where labels come back, a clearly marked estimate where they do not.

Labels arrive as confusion counts (rows = true class, columns = predicted), in a summary's `labels`
or through `POST /api/labels`. With enough of them the server compares accuracy with the accuracy
the build's gate measured for the int8 model, and flags a drop only when it is both practically large
(below gate - `max_accuracy_drop`) and statistically clear (one-sided binomial test at alpha).

Without labels, accuracy is estimated by the difference of confidences (DoC, Guillory et al.,
ICCV 2021): gate accuracy + (mean confidence now - mean confidence on the reference data). It holds
only under input (covariate) shift with a model whose confidence tracks its accuracy; under label
shift or a changed input->label relation (real concept drift) it can be badly wrong, which is why
every answer carries `estimate: true` and that caveat.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

from edge_kit.fleet.drift import load_windows
from edge_kit.fleet.reference_index import ModelReference
from edge_kit.fleet.settings import ConceptSettings
from edge_kit.fleet.storage import Storage

ESTIMATE_CAVEAT = ("estimate from confidence (difference of confidences); valid only under input shift, "
                   "not under label shift or concept drift")


def confusion_from_labels(true_classes: list[int], predicted: list[int], k: int) -> np.ndarray:
    t = np.asarray(true_classes, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1 or (t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k)):
        raise ValueError(f"'true' and 'pred' must be equally long lists of class indices in [0, {k})")
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def labelled_accuracy(storage: Storage, ref: ModelReference, since: float, settings: ConceptSettings,
                      alpha: float, device: str | None = None) -> dict[str, Any] | None:
    """Accuracy and confusion matrix from returned labels, or None when there are none.

    Fleet-wide (no `device`), each device's labels count at most `max_device_weight` x the (lower)
    median device's number of labels, so one device sending millions of right or wrong labels moves
    the figure by at most its share. `drifted` (the fleet's `accuracy_drop`) needs the drop with every
    single device left out too: one device alone never raises it. `devices_below_floor` names the
    devices whose own labels are below the floor (what a later alert's support is compared with).
    """
    k = len(ref.labels)
    per_device: dict[str, np.ndarray] = {}
    for dev, blob in storage.labels(ref.sha256, since):
        if device is not None and dev != device:
            continue
        m = np.frombuffer(blob, dtype=np.int64)
        if m.size != k * k:
            continue
        per_device[dev] = per_device.get(dev, np.zeros((k, k), dtype=np.int64)) + m.reshape(k, k)
    if not per_device:
        return None
    names = sorted(per_device)
    matrices = np.stack([per_device[d] for d in names]).astype(np.float64)  # (D, k, k)
    received = matrices.sum(axis=(1, 2))
    weighted = matrices * device_label_scale(received, settings.max_device_weight)[:, None, None]
    total = weighted.sum(axis=0)
    n = float(total.sum())
    if n == 0:
        return None
    accuracy = float(np.trace(total)) / n
    out: dict[str, Any] = {"estimate": False, "n": round(n), "n_received": int(received.sum()),
                           "devices": len(names), "accuracy": accuracy, "confusion": np.rint(total).astype(np.int64)
                           .tolist(), "classes": ref.labels, "gate_accuracy": ref.gate_accuracy, "drifted": False}
    if ref.gate_accuracy is not None:
        floor = ref.gate_accuracy - settings.max_accuracy_drop
        dropped, p = _accuracy_dropped(float(np.trace(total)), n, floor, settings, alpha)
        own = np.einsum("dii->d", matrices) / np.maximum(received, 1.0)
        below = [d for d, a, r in zip(names, own.tolist(), received.tolist(), strict=True) if r > 0 and a < floor]
        if device is None:  # the fleet's verdict: it must hold without any one device
            dropped = dropped and len(names) >= 2 and all(
                _accuracy_dropped(float(np.trace(total - w)), n - float(w.sum()), floor, settings, alpha)[0]
                for w in weighted)
        out.update({"drop": ref.gate_accuracy - accuracy, "floor": floor, "p_value": p, "drifted": dropped,
                    "devices_below_floor": below})
    return out


def device_label_scale(received: np.ndarray, max_device_weight: float) -> np.ndarray:
    """(D,) factor <= 1 per device: its labels count at most `max_device_weight` x the lower median's."""
    received = np.asarray(received, dtype=np.float64)
    if max_device_weight <= 0 or received.size == 0:
        return np.ones(received.size)
    cap = max_device_weight * np.sort(received)[(received.size - 1) // 2]
    return np.asarray(np.minimum(1.0, cap / np.maximum(received, 1.0)))


def _accuracy_dropped(correct: float, n: float, floor: float, settings: ConceptSettings,
                      alpha: float) -> tuple[bool, float]:
    """Whether `correct` of `n` labels (weighted, so rounded) is a drop below `floor`, and its p-value."""
    trials = round(n)
    if trials <= 0:
        return False, 1.0
    successes = min(round(correct), trials)
    p = float(binomtest(successes, trials, p=min(max(floor, 1e-9), 1 - 1e-9), alternative="less").pvalue)
    return bool(trials >= settings.min_labels and successes / trials < floor and p <= alpha), p


def estimated_accuracy(storage: Storage, ref: ModelReference, since: float,
                       device: str | None = None) -> dict[str, Any] | None:
    """DoC accuracy estimate from the confidence histograms; None without confidence channel or data."""
    if "out.confidence" not in ref.channel_names or ref.gate_accuracy is None:
        return None
    c = ref.channel_names.index("out.confidence")
    _, _, flat = load_windows(storage, ref, since, device)
    offset, bins = int(ref.bins[:c].sum()), int(ref.bins[c])
    current = flat[:, offset : offset + bins].sum(axis=0) if len(flat) else np.zeros(bins)
    n = int(current.sum())
    if n == 0:
        return None
    edges = ref.edges[c, : bins + 1]
    mid = np.clip((edges[:-1] + edges[1:]) / 2, 0.0, 1.0)
    ref_counts = ref.counts[c, :bins]
    # Same midpoint approximation on both sides, so it mostly cancels in the difference.
    conf_now = float((current * mid).sum() / n)
    conf_ref = float((ref_counts * mid).sum() / max(int(ref_counts.sum()), 1))
    estimate = float(np.clip(ref.gate_accuracy + conf_now - conf_ref, 0.0, 1.0))
    return {"estimate": True, "method": "difference of confidences", "caveat": ESTIMATE_CAVEAT, "n": n,
            "accuracy": estimate, "mean_confidence": conf_now, "reference_mean_confidence": conf_ref,
            "gate_accuracy": ref.gate_accuracy}
