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
    """Accuracy and confusion matrix from returned labels, or None when there are none."""
    k = len(ref.labels)
    total = np.zeros((k, k), dtype=np.int64)
    found = False
    for dev, blob in storage.labels(ref.sha256, since):
        if device is not None and dev != device:
            continue
        m = np.frombuffer(blob, dtype=np.int64)
        if m.size != k * k:
            continue
        total += m.reshape(k, k)
        found = True
    n = int(total.sum())
    if not found or n == 0:
        return None
    correct = int(np.trace(total))
    accuracy = correct / n
    out: dict[str, Any] = {"estimate": False, "n": n, "accuracy": accuracy, "confusion": total.tolist(),
                           "classes": ref.labels, "gate_accuracy": ref.gate_accuracy, "drifted": False}
    if ref.gate_accuracy is not None:
        floor = ref.gate_accuracy - settings.max_accuracy_drop
        p = float(binomtest(correct, n, p=min(max(floor, 1e-9), 1 - 1e-9), alternative="less").pvalue)
        out.update({"drop": ref.gate_accuracy - accuracy, "floor": floor, "p_value": p,
                    "drifted": bool(n >= settings.min_labels and accuracy < floor and p <= alpha)})
    return out


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
