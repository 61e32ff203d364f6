"""Test and benchmark helpers: a digits-shaped bundle with a real reference, and device summaries.

The "model" is a multinomial logistic regression fitted on scikit-learn's digits in numpy terms
(logits = X W + b); the bundle carries placeholder model bytes, which the fleet server never runs:
it only needs the manifest and reference.json.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.bundle.format import REFERENCE, canonical_json, read_bundle, write_bundle
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import Reference, build_reference
from device_agent.monitoring.summary import Histogrammer, WindowSummary
from device_agent.uplink.wire import summary_topic

LABELS = [str(i) for i in range(10)]


@functools.lru_cache(maxsize=1)
def digits_model() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, y_train, X_test, y_test, W, b) with X as (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x = (d.images / 16.0).astype(np.float64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], d.target[order]
    split = int(0.8 * len(x))
    clf = LogisticRegression(max_iter=2000).fit(x[:split].reshape(split, -1), y[:split])
    return (x[:split, None], y[:split], x[split:, None], y[split:], clf.coef_.T.copy(), clf.intercept_.copy())

# The operator token the `http` fixture's server requires for changes (and reads without open_reads).
OPERATOR_TOKEN = "fleet-test-operator-token-0123456789"


def logits(x: np.ndarray) -> np.ndarray:
    *_, w, b = digits_model()
    return np.asarray(x.reshape(len(x), -1) @ w + b)


@dataclass
class DigitsBundle:
    path: Path
    sha256: str
    plan: MonitorPlan
    reference: Reference  # as a device reads it from the bundle (reference.json's channel order)
    histogrammer: Histogrammer
    model: dict[str, str]
    gate_accuracy: float

    def values(self, x: np.ndarray) -> np.ndarray:
        """Channel values in the reference's channel order (the order the Histogrammer counts in)."""
        v = self.plan.values(x, logits(x))
        order = [self.plan.channel_names.index(n) for n in self.reference.names]
        return v[:, order]


def make_bundle(out_dir: Path, *, version: str = "1.0.0", bins: int = 32, model_bytes: bytes | None = None
                ) -> DigitsBundle:
    x_train, _, x_test, y_test, _, _ = digits_model()
    plan = MonitorPlan.for_image((1, 8, 8), LABELS)
    reference = build_reference(plan, plan.values(x_train, logits(x_train)), bins)
    accuracy = float((logits(x_test).argmax(axis=1) == y_test).mean())
    manifest = {"name": "digits", "version": version, "monitoring": plan.to_manifest(),
                "gate": {"metric": "accuracy", "fp32": accuracy, "int8": accuracy, "passed": True}}
    data = model_bytes if model_bytes is not None else f"placeholder model {version}".encode()
    path = write_bundle(out_dir, manifest, {"model.onnx": data, REFERENCE: canonical_json(reference.to_json())})
    bundle = read_bundle(path)
    stored = Reference.from_json(bundle.reference)
    return DigitsBundle(path, bundle.model_sha256, plan, stored, Histogrammer(stored),
                        {"name": "digits", "version": version, "sha256": bundle.model_sha256}, accuracy)


def summary(bundle: DigitsBundle, device: str, start: float, x: np.ndarray, *, fleet: str = "test",
            seq: int = 0, y: np.ndarray | None = None, end: float | None = None) -> WindowSummary:
    """One device window over images `x` (n, 1, 8, 8); with `y`, the confusion counts too."""
    s = WindowSummary.zero(bundle.histogrammer, fleet=fleet, device=device, model=bundle.model,
                           window_start=start, seq=seq, label_names=LABELS)
    out = logits(x)
    s.update(bundle.histogrammer, bundle.values(x))
    s.window_end = start + 60.0 if end is None else end
    if y is not None:
        s.update_labels(y, out.argmax(axis=1))
    return s


def sample_images(n: int, rng: np.random.Generator, noise: float = 0.0, held_out: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """n digits drawn with replacement, optionally with Gaussian pixel noise of sd `noise`.

    By default they come from the training images the reference was built from, so a clean window
    is a draw from exactly the reference distribution (the null hypothesis of the tests). The 360
    held-out images are a finite sample of their own: windows resampled from them differ from the
    reference by that sample's noise as well, which is real but not what a no-drift test should see.
    """
    x_pool, y_pool, x_test, y_test, _, _ = digits_model()
    if held_out:
        x_pool, y_pool = x_test, y_test
    idx = rng.integers(0, len(x_pool), n)
    x = x_pool[idx]
    if noise:
        x = np.clip(x + rng.normal(0.0, noise, x.shape), 0.0, 1.0)
    return x, y_pool[idx]


def populate(ingestor: object, bundle: DigitsBundle, *, devices: int = 8, drifting: tuple[str, ...] = ("dev00",),
             noise: float = 0.35, n: int = 300, windows: int = 3, now: float | None = None,
             fleet: str = "test") -> None:
    """Store `windows` windows per device through an Ingestor, 300 s apart, ending before `now`."""
    import time

    now = time.time() if now is None else now
    rng = np.random.default_rng(42)
    for w in range(windows):
        start = now - 300.0 * (windows - w) + 1.0
        for d in range(devices):
            name = f"dev{d:02d}"
            x, _ = sample_images(n, rng, noise=noise if name in drifting else 0.0)
            s = summary(bundle, name, start, x, fleet=fleet, seq=w, end=start + 290.0)
            ingestor.receive(summary_topic(fleet, name), *s.to_bytes())  # type: ignore[attr-defined]
        ingestor.flush()  # type: ignore[attr-defined]
