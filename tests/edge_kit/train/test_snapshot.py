"""The DVC-tracked snapshot: recorded with `dvc add`, verified by md5, rebuilt identically on a fresh clone."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from edge_kit.config import load_config
from edge_kit.errors import DataError
from edge_kit.train.data import load_dataset, materialise_snapshot
from edge_kit.train.snapshot import file_md5, recorded_md5, write_npz_deterministic
from tests.helpers.training import commit_all, git, make_project

pytestmark = pytest.mark.integration  # real DVC and git


def test_first_load_dvc_adds_the_snapshot(tmp_path: Path) -> None:
    config = load_config(make_project(tmp_path, "[project]\nname = 'd'\n"))
    info = materialise_snapshot(config)
    assert info.path == tmp_path.resolve() / "data" / "digits.npz"
    assert info.dvc_file.is_file()
    assert info.dvc_md5 == recorded_md5(info.dvc_file)  # written by DVC itself
    assert info.dvc_md5 == hashlib.md5(info.path.read_bytes()).hexdigest()
    assert "/digits.npz" in (tmp_path / "data" / ".gitignore").read_text()  # data in DVC, not git
    cached = list((tmp_path / ".dvc" / "cache").rglob("*"))
    assert any(p.is_file() and p.name == info.dvc_md5[2:] for p in cached)  # local DVC cache holds it
    # DVC itself agrees that the workspace matches the record.
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data/digits.npz.dvc"], cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout


def test_changed_snapshot_refuses_to_train(tmp_path: Path, edge_kit_cli) -> None:
    config_path = make_project(tmp_path, "[project]\nname = 'd'\n[train]\nepochs = 1\n")
    info = materialise_snapshot(load_config(config_path))
    original = info.path.read_bytes()
    info.path.write_bytes(original[:-10] + b"0123456789")
    with pytest.raises(DataError, match="does not match its DVC record"):
        load_dataset(load_config(config_path))
    result = edge_kit_cli("train", "--config", str(config_path))
    assert result.returncode == 2
    assert "does not match its DVC record digits.npz.dvc" in result.stderr and "dvc checkout" in result.stderr
    assert info.path.read_bytes()[-10:] == b"0123456789"  # nothing was overwritten behind the user's back
    assert not (tmp_path / ".edgekit" / "checkpoints").exists()


def test_fresh_clone_rebuilds_identical_bytes(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    info = materialise_snapshot(load_config(make_project(origin, "[project]\nname = 'd'\n")))
    commit_all(origin)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data" / "digits.npz").exists()  # git-ignored, never committed
    rebuilt = materialise_snapshot(load_config(clone / "edgekit.toml"))
    assert rebuilt.dvc_md5 == info.dvc_md5


def test_outside_a_dvc_repository(tmp_path: Path) -> None:
    (tmp_path / "edgekit.toml").write_text("[project]\nname = 'd'\n")
    with pytest.raises(DataError, match="not inside a DVC repository") as err:
        materialise_snapshot(load_config(tmp_path / "edgekit.toml"))
    assert "dvc init" in str(err.value)


def test_unreadable_dvc_record(tmp_path: Path) -> None:
    config = load_config(make_project(tmp_path, "[project]\nname = 'd'\n"))
    info = materialise_snapshot(config)
    info.dvc_file.write_text("outs: nonsense\n")
    with pytest.raises(DataError, match="cannot read the DVC record"):
        materialise_snapshot(config)


def test_deterministic_npz(tmp_path: Path) -> None:
    import numpy as np

    arrays = {"X": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([0, 1])}
    write_npz_deterministic(tmp_path / "a.npz", arrays)
    write_npz_deterministic(tmp_path / "b.npz", dict(reversed(arrays.items())))
    assert file_md5(tmp_path / "a.npz") == file_md5(tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as loaded:
        assert loaded["X"].tolist() == arrays["X"].tolist()
