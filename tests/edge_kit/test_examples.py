"""The shipped examples: valid configs, committed DVC records that a fresh clone rebuilds, real accuracy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from training_helpers import make_project

from edge_kit.config import load_config
from edge_kit.data import materialise_snapshot, snapshot_path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def copy_example(name: str, dest: Path) -> Path:
    """The example's tracked files (config, .dvc record, dvc.yaml) in a throwaway git+DVC repository."""
    config = make_project(dest, (EXAMPLES / name / "edgekit.toml").read_text())
    (dest / "data").mkdir()
    for record in (EXAMPLES / name / "data").glob("*.dvc"):
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
    assert stages["train"]["cmd"].startswith("edge-kit train --config edgekit.toml --json")
    assert stages["build"]["cmd"].startswith("edge-kit build --config edgekit.toml --out dist")
    assert any(str(dep).startswith("data/") for dep in stages["train"]["deps"])
    assert (EXAMPLES / name / ".gitignore").read_text().count("/.edgekit/") == 1


@pytest.mark.slow
@pytest.mark.integration
def test_tabular_example_reaches_95_percent(tmp_path: Path, edge_kit_cli) -> None:
    config = copy_example("tabular", tmp_path)
    result = edge_kit_cli("train", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    out = result.json()
    assert out["metrics"]["test_accuracy"] >= 0.95
    assert Path(out["onnx"]).is_file() and out["metrics"]["onnx_max_abs_diff"] <= 1e-4
