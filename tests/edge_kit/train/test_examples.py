"""The shipped examples: valid configs, committed DVC records that a fresh clone rebuilds, real accuracy,
and `dvc repro` on a fresh clone (the snapshot is a stage of dvc.yaml)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_kit.config import load_config
from edge_kit.train.data import materialise_snapshot, read_snapshot, snapshot_path
from edge_kit.train.snapshot import file_md5
from harness.processes import cli_env
from tests.helpers.training import commit_all, git, make_project

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


SNAPSHOTS = [("digits", "digits.npz"), ("tabular", "breast_cancer.npz")]


def copy_example(name: str, dest: Path) -> Path:
    """The example's tracked files (config, .gitignore files, dvc.yaml, dvc.lock) in a throwaway git+DVC repo."""
    config = make_project(dest, (EXAMPLES / name / "edgekit.toml").read_text())
    (dest / "data").mkdir()
    for record in [*(EXAMPLES / name / "data").glob("*.dvc"), EXAMPLES / name / "data" / ".gitignore"]:
        shutil.copy(record, dest / "data" / record.name)
    for tracked in ("dvc.yaml", "dvc.lock", ".gitignore"):
        shutil.copy(EXAMPLES / name / tracked, dest / tracked)
    return config


def _locked_snapshot(name: str, snapshot: str) -> dict:
    lock = yaml.safe_load((EXAMPLES / name / "dvc.lock").read_text())
    [out] = lock["stages"]["snapshot"]["outs"]
    assert out["path"] == f"data/{snapshot}"
    return dict(out)


@pytest.mark.parametrize(("name", "snapshot"), SNAPSHOTS)
def test_committed_dvc_record_is_rebuilt_exactly(tmp_path: Path, name: str, snapshot: str) -> None:
    config = load_config(copy_example(name, tmp_path))
    assert snapshot_path(config).name == snapshot
    assert not snapshot_path(config).exists()  # as on a fresh clone: the data file is git-ignored
    info = materialise_snapshot(config)  # raises DataError if the bytes differ from the committed md5
    assert info.dvc_file == tmp_path.resolve() / "dvc.lock"  # the snapshot stage's record, not a `dvc add`
    assert info.dvc_md5 == file_md5(snapshot_path(config)) == _locked_snapshot(name, snapshot)["md5"]
    assert not (tmp_path / "data" / f"{snapshot}.dvc").exists()
    raw = read_snapshot(config, info.path)  # what the stored snapshot says about itself survives the round trip
    assert (raw.input_kind, len(raw.feature_names)) == {"digits": ("image", 0), "tabular": ("features", 30)}[name]


@pytest.mark.parametrize(("name", "snapshot"), SNAPSHOTS)
def test_dvc_pipeline_makes_the_snapshot_and_calls_the_cli(name: str, snapshot: str) -> None:
    stages = yaml.safe_load((EXAMPLES / name / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["snapshot", "train", "build"]
    assert stages["snapshot"]["cmd"] == "edge-kit data snapshot --config edgekit.toml"
    assert stages["snapshot"]["outs"] == [{f"data/{snapshot}": {"persist": True}}]  # a changed one is kept, refused
    assert f"data/{snapshot}" in stages["train"]["deps"]
    assert "edge-kit train --config edgekit.toml --json" in stages["train"]["cmd"]
    assert "edge-kit build --config edgekit.toml --out dist" in stages["build"]["cmd"]
    assert (EXAMPLES / name / ".gitignore").read_text().count("/.edgekit/") == 1
    # One owner per output: a `.dvc` record of the same file would make DVC refuse the whole pipeline.
    assert not list((EXAMPLES / name / "data").glob("*.dvc"))
    assert _locked_snapshot(name, snapshot)["md5"]


def test_a_changed_snapshot_is_kept_and_refused(tmp_path: Path, edge_kit_cli) -> None:
    config = copy_example("digits", tmp_path)
    first = edge_kit_cli("data", "snapshot", "--config", str(config), "--json", timeout=120)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["dvc_md5"] == _locked_snapshot("digits", "digits.npz")["md5"]
    snapshot = Path(out["path"])
    changed = snapshot.read_bytes() + b"x"
    snapshot.write_bytes(changed)
    again = edge_kit_cli("data", "snapshot", "--config", str(config), "--json", timeout=120)
    assert again.returncode == 2, again.stderr
    assert "does not match its DVC record dvc.lock" in again.stderr and "dvc checkout snapshot" in again.stderr
    assert json.loads(again.stdout)["exit_code"] == 2
    assert snapshot.read_bytes() == changed  # nothing overwritten
    refused = edge_kit_cli("train", "--config", str(config), timeout=120)
    assert refused.returncode == 2 and "refusing to train on unrecorded data" in refused.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_on_a_fresh_clone_runs_from_the_snapshot_to_the_signed_bundle(tmp_path: Path,
                                                                              edge_kit_cli) -> None:
    """A fresh `git clone`: no data file, an empty DVC cache. `dvc repro` makes the snapshot (checked against
    the committed dvc.lock), trains on it and builds the signed bundle; a second `dvc repro` has nothing to do."""
    origin = tmp_path / "origin"
    copy_example("tabular", origin)
    commit_all(origin)
    clone = tmp_path / "work" / "clone"  # dvc.yaml's key is ../../.keys/edgekit.key, as in this repository
    clone.parent.mkdir()
    git(clone.parent, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data" / "breast_cancer.npz").exists() and not (clone / ".dvc" / "cache").exists()
    keys = edge_kit_cli("keygen", "--out", str(tmp_path / ".keys"), timeout=60)
    assert keys.returncode == 0, keys.stderr
    # `edge-kit` on PATH for DVC's stage commands: this checkout's CLI, as the suite's fixtures run it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "edge-kit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edge_kit "$@"\n')
    shim.chmod(0o755)
    env = cli_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"})
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran = [proc.stdout.index(f"Running stage '{stage}'") for stage in ("snapshot", "train", "build")]
    assert ran == sorted(ran)
    snapshot = clone / "data" / "breast_cancer.npz"
    assert file_md5(snapshot) == _locked_snapshot("tabular", "breast_cancer.npz")["md5"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"snapshot", "train", "build"}
    [data_dep] = [d for d in lock["train"]["deps"] if d["path"] == "data/breast_cancer.npz"]
    assert data_dep["md5"] == lock["snapshot"]["outs"][0]["md5"]
    out = json.loads((clone / ".edgekit" / "train.json").read_text())
    assert out["metrics"]["test_accuracy"] >= 0.95  # breast cancer, MLP
    assert Path(out["onnx"]).is_file() and out["metrics"]["onnx_max_abs_diff"] <= 1e-4
    [bundle] = (clone / "dist").glob("*.edgebundle")
    verified = edge_kit_cli("verify", str(bundle), "--pubkey", str(tmp_path / ".keys" / "edgekit.pub"), timeout=60)
    assert verified.returncode == 0, verified.stderr
    shown = edge_kit_cli("inspect", str(bundle), "--json", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert lock["snapshot"]["outs"][0]["md5"] in shown.stdout  # the bundle's provenance names the data it used
    again = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout + again.stderr
