"""`edge-kit bench --config` on a bundle from the real `edge-kit build`: the three engines, the held-out
split, the training run's own fp32 ONNX and checkpoint, and the report logged back to that run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.format import read_bundle
from edge_kit.config import load_config
from edge_kit.train.run_record import FINAL_CHECKPOINT, ONNX_FILE, run_folder
from tests.helpers.bench_fixtures import load_report

CONFIG = """
[project]
name = "digits-bench"
version = "0.1.0"
[data]
source = "sklearn:digits"
[model]
factory = "edge_kit.models:mlp"
kwargs = { hidden = [32] }
[train]
epochs = 3
batch_size = 64
lr = 3e-3
"""


def _built_bundle(config_path: Path, out: Path) -> tuple[Path, str]:
    """The real `edge-kit build` (train, quantize, gate, bundle), unsigned; the bundle and its MLflow run id."""
    from edge_kit.ship.build import build

    result = build(load_config(config_path), out, signing_key=None)
    return result.bundle, result.run_id


@pytest.mark.slow
@pytest.mark.integration
def test_bench_with_config_measures_the_runs_own_models(edge_kit_cli, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    (project / "edgekit.toml").write_text(CONFIG)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    bundle, run_id = _built_bundle(project / "edgekit.toml", tmp_path / "dist")
    config = load_config(project / "edgekit.toml")
    run_dir = run_folder(config, run_id)

    out = tmp_path / "report"
    result = edge_kit_cli("bench", str(bundle), "--config", str(project / "edgekit.toml"), "--out", str(out),
                          "--quick", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc.pop("ok") is True  # the CLI runner's success marker, beside the report's own fields
    assert doc == load_report(out)
    engines = doc["engines"]
    assert list(engines) == ["int8", "fp32", "pytorch"] and doc["missing"] == {}
    # The run's own files, from its local folder, not copies of something else.
    assert engines["fp32"]["model_file"] == str(run_dir / ONNX_FILE)
    assert engines["pytorch"]["model_file"] == str(run_dir / FINAL_CHECKPOINT)
    assert engines["pytorch"]["model_bytes"] == (run_dir / FINAL_CHECKPOINT).stat().st_size
    # The held-out split: the same accuracy the training run measured for this checkpoint.
    assert doc["data"]["labelled"] and doc["data"]["n"] == 360
    manifest = read_bundle(bundle).manifest
    client = MlflowClient(tracking_uri=manifest["provenance"]["mlflow"]["tracking_uri"])
    test_accuracy = client.get_run(run_id).data.metrics["test_accuracy"]
    assert engines["pytorch"]["accuracy"] == pytest.approx(test_accuracy, abs=1e-9)
    assert engines["fp32"]["accuracy"] == pytest.approx(test_accuracy, abs=1 / 360)
    # The build's gate measured int8 on the same split with ONNX Runtime: the same figure here.
    assert engines["int8"]["accuracy"] == pytest.approx(manifest["gate"]["int8"], abs=1e-9)
    assert doc["notes"] == []
    for e in engines.values():
        for lat in e["latency_ms"]:
            assert lat["p50"] <= lat["p95"] <= lat["p99"]

    assert doc["mlflow"]["logged"] is True
    metrics = client.get_run(run_id).data.metrics
    assert metrics["bench.pytorch.accuracy"] == pytest.approx(engines["pytorch"]["accuracy"])
    assert np.isclose(metrics["bench.int8.model_bytes"], engines["int8"]["model_bytes"])
