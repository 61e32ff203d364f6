"""The shipped examples: valid configs, committed DVC records that a fresh clone rebuilds, real accuracy."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from edge_kit.config import load_config
from edge_kit.train.data import materialise_snapshot, snapshot_path
from edge_kit.train.run import train
from tests.helpers.training import commit_all, make_project

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def copy_example(name: str, dest: Path) -> Path:
    """The example's tracked files (config, .dvc record, data/.gitignore, dvc.yaml) in a throwaway git+DVC repo."""
    config = make_project(dest, (EXAMPLES / name / "edgekit.toml").read_text())
    (dest / "data").mkdir()
    for record in [*(EXAMPLES / name / "data").glob("*.dvc"), EXAMPLES / name / "data" / ".gitignore"]:
        shutil.copy(record, dest / "data" / record.name)
    shutil.copy(EXAMPLES / name / "dvc.yaml", dest / "dvc.yaml")
    return config


@pytest.mark.parametrize(("name", "snapshot"), [("digits", "digits.npz"), ("tabular", "breast_cancer.npz")])
def test_committed_dvc_record_is_rebuilt_exactly(tmp_path: Path, name: str, snapshot: str) -> None:
    config = load_config(copy_example(name, tmp_path))
    assert snapshot_path(config).name == snapshot
    assert not snapshot_path(config).exists()  # as on a fresh clone: the data file is git-ignored
    info = materialise_snapshot(config)  # raises DataError if the bytes differ from the committed md5
    assert info.dvc_file == tmp_path.resolve() / "data" / f"{snapshot}.dvc"


@pytest.mark.parametrize("name", ["digits", "tabular"])
def test_dvc_pipeline_calls_the_cli(name: str) -> None:
    stages = yaml.safe_load((EXAMPLES / name / "dvc.yaml").read_text())["stages"]
    assert "edge-kit train --config edgekit.toml --json" in stages["train"]["cmd"]
    assert "edge-kit build --config edgekit.toml --out dist" in stages["build"]["cmd"]
    assert any(str(dep).startswith("data/") for dep in stages["train"]["deps"])
    assert (EXAMPLES / name / ".gitignore").read_text().count("/.edgekit/") == 1


def _root_conftest() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "conftest.py"
    spec = importlib.util.spec_from_file_location("edge_kit_tests_root_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_trains_the_tabular_example(tmp_path: Path) -> None:
    """`dvc repro` runs the train stage through the CLI; the build stage can then reuse that run."""
    project = tmp_path / "clone"
    config = copy_example("tabular", project)
    commit_all(project)  # as cloned: .dvc record committed, data file absent, DVC cache empty
    materialise_snapshot(load_config(config))  # what `edge-kit train` does first; checked against the record
    # `edge-kit` on PATH for DVC's stage command: this checkout's CLI, as the suite's fixtures run it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "edge-kit"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m edge_kit "$@"\n')
    shim.chmod(0o755)
    env = _root_conftest().cli_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"})
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "train"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((project / ".edgekit" / "train.json").read_text())
    assert out["metrics"]["test_accuracy"] >= 0.95  # breast cancer, MLP
    assert Path(out["onnx"]).is_file() and out["metrics"]["onnx_max_abs_diff"] <= 1e-4
    assert (project / "dvc.lock").is_file()  # DVC recorded the stage
    # What `edge-kit build` does next: dvc.lock is new, the code is still the commit, so the run is reused.
    again = train(load_config(config), reuse=True)
    assert again.reused and again.run_id == out["run_id"]
