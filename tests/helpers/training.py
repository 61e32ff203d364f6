"""Helpers for the training tests: throwaway git + DVC projects built in tmp_path, nothing downloaded."""

from __future__ import annotations

import subprocess
from pathlib import Path

# A tiny CNN on digits: enough steps for mid-epoch checkpoints (23 steps per epoch), fast on 2 cores.
TINY_DIGITS = """\
[project]
name = "tiny"
version = "0.1.0"

[data]
source = "sklearn:digits"
test_fraction = 0.2
seed = 0

[model]
factory = "edge_kit.models:small_cnn"
kwargs = { channels = [4, 8], hidden = 16, dropout = 0.1 }

[train]
epochs = {epochs}
batch_size = 64
lr = 0.01
seed = 0
checkpoint_every = 4
keep_checkpoints = 3
"""


def tiny_config(epochs: int = 2) -> str:
    return TINY_DIGITS.replace("{epochs}", str(epochs))


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def make_project(root: Path, config_text: str, *, scm: bool = True) -> Path:
    """A git repository with DVC initialised and a config at its root; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    if scm:
        git(root, "init", "-q")
        git(root, "config", "user.email", "test@example.com")
        git(root, "config", "user.name", "edge-kit tests")
        git(root, "config", "commit.gpgsign", "false")
    from dvc.repo import Repo

    Repo.init(str(root), no_scm=not scm).close()
    (root / ".gitignore").write_text(".edgekit/\n")
    config = root / "edgekit.toml"
    config.write_text(config_text)
    return config


def commit_all(root: Path, message: str = "snapshot") -> str:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")

