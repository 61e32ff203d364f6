"""Monitored channels: which scalar values per inference the agent summarises.

The build computes reference histograms over the training data from these same values, and the
agent computes them live, so both sides call `MonitorPlan.values` and cannot disagree.

Channels, in order:
- inputs, tabular: one channel per feature, `in.<feature name>`;
- inputs, images: compact summaries instead of every pixel: the mean of each row `in.row<i>` and
  column `in.col<j>` (they move when the image is shifted or rotated), the image mean `in.mean`
  (brightness) and pixel standard deviation `in.std` (noise, contrast);
- outputs: each class probability `out.p.<label>`, the top probability `out.confidence` (used to
  estimate accuracy when no labels come back), and the predicted class `out.pred` (a class channel:
  one bin per class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NUMERIC = "numeric"
CLASS = "class"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class MonitorPlan:
    """How to turn a batch of raw inputs and model outputs into one value per channel per sample."""

    input_kind: str  # "features" or "image"
    input_shape: tuple[int, ...]  # one sample's shape, without the batch dimension
    feature_names: tuple[str, ...]
    output_kind: str  # "logits" or "probabilities"
    labels: tuple[str, ...]

    @classmethod
    def for_features(cls, feature_names: list[str], labels: list[str], output_kind: str = "logits") -> MonitorPlan:
        return cls("features", (len(feature_names),), tuple(feature_names), output_kind, tuple(labels))

    @classmethod
    def for_image(cls, input_shape: tuple[int, ...], labels: list[str], output_kind: str = "logits") -> MonitorPlan:
        if len(input_shape) < 2:
            raise ValueError(f"an image input needs at least 2 dimensions, got {input_shape}")
        return cls("image", tuple(input_shape), (), output_kind, tuple(labels))

    @classmethod
    def from_manifest(cls, monitoring: dict[str, Any]) -> MonitorPlan:
        """Read the `monitoring` entry of a bundle manifest (see `to_manifest`)."""
        try:
            return cls(
                str(monitoring["input_kind"]),
                tuple(int(d) for d in monitoring["input_shape"]),
                tuple(str(n) for n in monitoring.get("feature_names", [])),
                str(monitoring["output_kind"]),
                tuple(str(label) for label in monitoring["labels"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"manifest 'monitoring' entry is malformed: {exc}") from exc

    def to_manifest(self) -> dict[str, Any]:
        return {
            "input_kind": self.input_kind,
            "input_shape": list(self.input_shape),
            "feature_names": list(self.feature_names),
            "output_kind": self.output_kind,
            "labels": list(self.labels),
            "channels": self.channel_names,
            "reference": "reference.json",
        }

    @property
    def channel_names(self) -> list[str]:
        if self.input_kind == "features":
            names = [f"in.{n}" for n in self.feature_names]
        else:
            rows, cols = self.input_shape[-2], self.input_shape[-1]
            names = [f"in.row{i}" for i in range(rows)] + [f"in.col{j}" for j in range(cols)]
            names += ["in.mean", "in.std"]
        names += [f"out.p.{label}" for label in self.labels]
        names += ["out.confidence", "out.pred"]
        return names

    def channel_kind(self, name: str) -> str:
        return CLASS if name == "out.pred" else NUMERIC

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
        return softmax(out) if self.output_kind == "logits" else out

    def values(self, inputs: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """(n, channels) float64 matrix of channel values for a batch; vectorised, no per-value loop."""
        return self.values_by_channel(inputs, outputs).T

    def values_by_channel(
        self, inputs: np.ndarray, outputs: np.ndarray, predicted: np.ndarray | None = None
    ) -> np.ndarray:
        """The same values channel-major, (channels, n) and contiguous.

        Channel-major because every reduction here then runs along a long contiguous batch axis
        (numpy vectorises those well) instead of along a short axis per sample (one slow inner loop
        per sample): about 3x faster, which is what keeps monitoring cheap next to the model. No
        BLAS either: numpy's matmul goes to multithreaded OpenBLAS, which on a busy 2-core device
        took 10+ ms for what is 50 us single-threaded. `predicted` (the argmax of `outputs`, which
        the caller usually has already) saves recomputing it.
        """
        n = len(inputs)
        if self.input_kind == "features":
            x = np.asarray(inputs).reshape(n, -1).T.astype(np.float64)
            n_inputs = x.shape[0]
        else:
            rows, cols = self.input_shape[-2], self.input_shape[-1]
            planes = np.asarray(inputs).reshape(n, -1, rows * cols)
            img = planes[:, 0, :] if planes.shape[1] == 1 else planes.mean(axis=1, dtype=np.float64)
            x = img.T.astype(np.float64)  # (H*W, n)
            n_inputs = rows + cols + 2
        k = len(self.labels)
        out = np.empty((n_inputs + k + 2, n), dtype=np.float64)
        if self.input_kind == "features":
            out[:n_inputs] = x
        else:
            grid = x.reshape(rows, cols, n)
            out[:rows] = np.einsum("ijn->in", grid) / cols
            out[rows : rows + cols] = np.einsum("ijn->jn", grid) / rows
            mean = out[:rows].sum(axis=0) / rows
            # std from E[x^2] - E[x]^2 in float64: within 1e-12 of the two-pass value for pixel data.
            var = np.einsum("pn,pn->n", x, x) / (rows * cols) - mean * mean
            out[rows + cols] = mean
            out[rows + cols + 1] = np.sqrt(np.maximum(var, 0.0))
        probs = out[n_inputs : n_inputs + k]
        if self.output_kind == "logits":
            # Softmax in float32, what the model outputs anyway: float32 exp is 5x faster than
            # float64 and probabilities need no more than 1e-7 for 32-bin histograms.
            logits = np.ascontiguousarray(np.asarray(outputs, dtype=np.float32).reshape(n, -1).T)
            shifted = logits - logits.max(axis=0)
            np.exp(shifted, out=shifted)
            shifted /= shifted.sum(axis=0)
            probs[:] = shifted
        else:
            probs[:] = np.asarray(outputs, dtype=np.float64).reshape(n, -1).T
        out[n_inputs + k] = probs.max(axis=0)
        out[n_inputs + k + 1] = probs.argmax(axis=0) if predicted is None else predicted
        return out
