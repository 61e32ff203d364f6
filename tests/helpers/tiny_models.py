"""Tiny seeded models and data for the compiler tests, exported to ONNX like the pipeline does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class TinyCase:
    """An exported fp32 model with its train and test splits."""

    onnx: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export with a dynamic batch, input "input", output "logits" (the pipeline's contract)."""
    model.eval()
    torch.onnx.export(
        model, (example,), str(path), input_names=["input"], output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, dynamo=True, verbose=False,
    )
    return path


class TinyCnn(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def image_data(n: int = 400, seed: int = 0, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """8x8 one-channel images whose class is the quadrant holding a bright blob."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = rng.normal(0.0, 0.3, size=(n, 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = (c // 2) * 4, (c % 2) * 4
        x[i, 0, r : r + 4, col : col + 4] += 2.0
    return x, y.astype(np.int64)


def trained_cnn(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 30) -> TinyCnn:
    torch.manual_seed(seed)
    model = TinyCnn(int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    return model.eval()


class OutlierMlp(nn.Module):
    """A correct classifier with one layer whose activations carry rare, huge outliers.

    `embed`, `mix` and `head` are exact (identity-like) maps of the class scores x @ W, split into positive
    and negative parts. In `outlier`, one extra unit is 5000 * relu(s0 - 2|w0|): zero for ~98% of
    inputs and thousands for the rest, and `mix` ignores it, so fp32 accuracy is untouched. But
    per-tensor calibration of that layer's output must cover the thousands, which leaves a
    quantization step far above the useful values: plain int8 collapses to near chance. Keeping
    `outlier`'s output in fp32 (the layer and its reader) repairs it; no other single layer does.
    """

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        features, classes = w.shape
        width = 2 * classes
        self.embed = nn.Linear(features, width)
        self.outlier = nn.Linear(width, width + 1)
        self.mix = nn.Linear(width + 1, width)
        self.head = nn.Linear(width, classes)
        eye = torch.eye(classes)
        wt = torch.from_numpy(w.T.astype(np.float32))
        with torch.no_grad():
            for layer in (self.embed, self.outlier, self.mix, self.head):
                layer.weight.zero_()
                layer.bias.zero_()
            self.embed.weight[:classes] = wt
            self.embed.weight[classes:] = -wt
            self.outlier.weight[:width, :width] = torch.eye(width)
            # The outlier unit reads the first class score s0 ~ N(0, |w0|); it fires when
            # s0 > 2 |w0|, about 2% of the time.
            threshold = 2.0 * float(np.linalg.norm(w[:, 0]))
            self.outlier.weight[width, 0] = 5000.0
            self.outlier.bias[width] = -threshold * 5000.0
            self.mix.weight[:, :width] = torch.eye(width)
            self.head.weight[:, :classes] = eye
            self.head.weight[:, classes:] = -eye

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        h = torch.relu(self.outlier(h))
        h = torch.relu(self.mix(h))
        return self.head(h)


class ConcatStretchMlp(nn.Module):
    """A correct classifier whose classifier input is stretched by a constant, information-free channel.

    `embed` is an exact map of the class scores x @ W into positive and negative parts; a constant
    5000 is concatenated to it and `head` ignores it, so fp32 accuracy is perfect. But per-tensor
    calibration of the Concat output must cover 5000, which rounds every class score to zero: plain
    int8 is at chance. The constant comes from Expand, not from a layer, so the only layer-level repair
    keeps `embed` and everything after it in fp32; keeping the Concat output float is enough.
    """

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        features, classes = w.shape
        self.embed = nn.Linear(features, 2 * classes)
        self.head = nn.Linear(2 * classes + 1, classes)
        wt = torch.from_numpy(w.T.astype(np.float32))
        with torch.no_grad():
            for layer in (self.embed, self.head):
                layer.weight.zero_()
                layer.bias.zero_()
            self.embed.weight[:classes] = wt
            self.embed.weight[classes:] = -wt
            self.head.weight[:, :classes] = torch.eye(classes)
            self.head.weight[:, classes : 2 * classes] = -torch.eye(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        return self.head(torch.cat([h, torch.full_like(h[:, :1], 5000.0)], 1))


def tabular_data(
    n: int = 800, seed: int = 0, features: int = 8, classes: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes))
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int64)
    return x, y, w
