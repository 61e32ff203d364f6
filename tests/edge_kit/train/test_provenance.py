"""Provenance: git commit and dirtiness, lock hash, versions, container digest, data md5."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pytest

from edge_kit.config import load_config
from edge_kit.train.data import load_dataset
from edge_kit.train.provenance import collect_provenance, container_image, git_state
from tests.helpers.training import commit_all, git, make_project


def test_git_commit_and_dirty(tmp_path: Path) -> None:
    config_path = make_project(tmp_path, "[project]\nname = 'p'\n")
    assert git_state(tmp_path)["commit"] is None  # no commit yet
    commit = commit_all(tmp_path)
    assert git_state(tmp_path) == {"commit": commit, "dirty": False, "root": str(tmp_path.resolve())}
    config_path.write_text("[project]\nname = 'q'\n")
    assert git_state(tmp_path)["dirty"] is True
    (tmp_path / ".edgekit").mkdir()
    (tmp_path / ".edgekit" / "x").write_text("ignored state does not make the tree dirty")
    commit_all(tmp_path)
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dvc.lock").write_text("schema: '2.0'\n")  # `dvc repro` results, not code
    assert git_state(tmp_path / "sub")["dirty"] is False
    (tmp_path / "sub" / "model.py").write_text("x = 1\n")  # new code, even untracked, is dirty
    assert git_state(tmp_path / "sub")["dirty"] is True


def test_not_a_repository(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "root": None}


def test_environment_and_data_legs(tmp_path: Path) -> None:
    (tmp_path / "requirements").mkdir()
    lock = tmp_path / "requirements" / "lock.txt"
    lock.write_text("numpy==2.0.0\n")
    config = load_config(make_project(tmp_path, "[project]\nname = 'p'\n"))
    dataset = load_dataset(config)
    prov = collect_provenance(config, dataset)
    env = prov["environment"]
    assert env["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert env["python"] == platform.python_version()
    assert {"torch", "onnxruntime", "numpy"} <= set(env["packages"])
    import torch

    assert env["cuda"] is None if torch.version.cuda is None else env["cuda"]["version"] == torch.version.cuda
    assert prov["data"]["dvc_md5"] == dataset.snapshot.dvc_md5 and prov["data"]["path"] == "data/digits.npz"
    assert set(prov["git"]) == {"commit", "dirty"}


def test_lock_falls_back_to_edge_kits_own(tmp_path: Path) -> None:
    config = load_config(make_project(tmp_path, "[project]\nname = 'p'\n"))
    own = Path(__file__).resolve().parents[3] / "requirements" / "lock.txt"
    assert collect_provenance(config)["environment"]["lock_sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()


def test_lock_named_by_the_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / "image-lock.txt"
    lock.write_text("torch==2.13.0+cpu\n")
    monkeypatch.setenv("EDGEKIT_LOCK_FILE", str(lock))
    config = load_config(make_project(tmp_path / "p", "[project]\nname = 'p'\n"))
    env = collect_provenance(config)["environment"]
    assert env["lock_path"] == str(lock) and env["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    monkeypatch.setenv("EDGEKIT_LOCK_FILE", str(tmp_path / "missing.txt"))
    assert collect_provenance(config)["environment"]["lock_sha256"] is None


def test_container_digest_when_exposed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEKIT_IMAGE_DIGEST", "sha256:" + "ab" * 32)
    found = container_image()
    assert found is not None and found["digest"] == "sha256:" + "ab" * 32
    monkeypatch.delenv("EDGEKIT_IMAGE_DIGEST")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    if not Path("/.dockerenv").exists() and not Path("/run/.containerenv").exists():
        assert container_image() is None


def test_pipeline_state_never_dirties_the_tree(tmp_path: Path) -> None:
    config_path = make_project(tmp_path, "[project]\nname = 'p'\n")
    (tmp_path / ".gitignore").unlink()  # a user who never heard of .edgekit/
    commit_all(tmp_path)
    load_dataset(load_config(config_path))  # writes .edgekit/split.json and the DVC record
    assert (tmp_path / ".edgekit" / "split.json").is_file()
    status = git(tmp_path, "status", "--porcelain", "--untracked-files=all")
    assert "data/digits.npz.dvc" in status and ".edgekit" not in status
    commit_all(tmp_path, "record the snapshot")  # the .dvc file and data/.gitignore belong in git
    assert git_state(tmp_path)["dirty"] is False
    tracked = git(tmp_path, "ls-files")
    assert "data/digits.npz.dvc" in tracked and ".edgekit" not in tracked and "digits.npz\n" not in tracked

