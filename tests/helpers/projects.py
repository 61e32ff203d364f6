"""Throwaway git + DVC projects for the build tests, in tmp_path; nothing downloaded."""

from __future__ import annotations

import subprocess
from pathlib import Path

TINY_DIGITS = """\
[project]
name = "{name}"
version = "0.1.0"

[data]
source = "sklearn:digits"
seed = 0

[model]
factory = "{factory}"
kwargs = {kwargs}

[train]
epochs = 3
batch_size = 64
lr = 0.01
seed = 0
checkpoint_every = 1000

[quantize]
backend = "{backend}"
calibration_samples = 128

[gate]
max_drop = {max_drop}
max_fallback_rounds = {rounds}
"""

# A digits classifier with one activation that carries rare, huge outliers: a "spike" unit that is
# 5000 x (how far the brightest standardised pixel exceeds 1.5). `mask` (a buffer, not trained)
# zeroes it before the next layer, so fp32 ignores it, but the tensor holding it must be
# calibrated to cover the spikes, which wipes out every other value in plain int8.
OUTLIER_NET = '''
import math

import torch
from torch import nn


class OutlierNet(nn.Module):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, 32)
        self.mix = nn.Linear(33, 32)
        self.head = nn.Linear(32, num_classes)
        self.register_buffer("mask", torch.cat([torch.ones(32), torch.zeros(1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        h = torch.relu(self.embed(x))
        spike = 5000.0 * torch.relu(x.amax(dim=1, keepdim=True) - 1.5)
        h = torch.cat([h, spike], dim=1) * self.mask
        return self.head(torch.relu(self.mix(h)))


def build(input_shape, num_classes):
    return OutlierNet(math.prod(input_shape), num_classes)
'''


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def make_project(root: Path, *, name: str = "tiny", factory: str = "edge_kit.models:small_cnn",
                 kwargs: str = "{ channels = [4, 8], hidden = 16, dropout = 0.0 }", backend: str = "ort",
                 max_drop: float = 0.02, rounds: int = 4, files: dict[str, str] | None = None) -> Path:
    """git + DVC repository with the config, its data snapshot materialised and everything committed."""
    from dvc.repo import Repo

    from edge_kit.config import load_config
    from edge_kit.train.data import load_dataset

    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "edge-kit tests")
    git(root, "config", "commit.gpgsign", "false")
    Repo.init(str(root)).close()
    (root / ".gitignore").write_text(".edgekit/\ndist/\n*.report.md\n__pycache__/\n")
    for rel, text in (files or {}).items():
        (root / rel).write_text(text)
    config = root / "edgekit.toml"
    config.write_text(TINY_DIGITS.format(name=name, factory=factory, kwargs=kwargs, backend=backend,
                                         max_drop=max_drop, rounds=rounds))
    load_dataset(load_config(config))  # materialise + `dvc add` the snapshot, so the commit below is clean
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return config
