"""`edge-kit bench --config` on a bundle of a real training run: the three engines, the held-out split,
the run's own fp32 ONNX and checkpoint, and the report logged back to that run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_fixtures import load_report

from edge_kit.train import TrainResult

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


def _bundle_from_run(config_path: Path, out: Path) -> tuple[Path, TrainResult]:
    """Train with the pipeline, quantize its fp32 ONNX (ONNX Runtime, QDQ) and write a bundle naming the run."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from device_agent.bundle import write_bundle
    from edge_kit.config import load_config
    from edge_kit.data import load_dataset
    from edge_kit.train import train

    config = load_config(config_path)
    result = train(config)
    dataset = load_dataset(config)
    calibration = dataset.preprocess(dataset.X_train[:256])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"input": calibration[i : i + 64]} for i in range(0, len(calibration), 64)])

        def get_next(self):  # type: ignore[override]
            return next(self._batches, None)

    int8 = out / "int8.onnx"
    quantize_static(str(result.onnx), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    manifest = {
        "name": "digits-bench", "version": "0.1.0", "created_at": "2026-01-01T00:00:00Z",
        "model": {"precision": "int8", "labels": dataset.labels, "preprocessing": dataset.preprocessing},
        "provenance": {"mlflow": {"tracking_uri": result.tracking_uri, "experiment_id": result.experiment_id,
                                  "run_id": result.run_id},
                       "data": {"dvc_md5": dataset.snapshot.dvc_md5}},
        "quantization": {"backend": "ort", "format": "QDQ", "per_channel": True, "target": "x86-vnni",
                         "excluded_nodes": []},
        "gate": {"metric": "accuracy", "max_drop": 0.05},
    }
    return write_bundle(out / "dist", manifest, {"model.onnx": int8.read_bytes()}), result


@pytest.mark.slow
@pytest.mark.integration
def test_bench_with_config_measures_the_runs_own_models(edge_kit_cli, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    (project / "edgekit.toml").write_text(CONFIG)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    bundle, run = _bundle_from_run(project / "edgekit.toml", tmp_path)

    out = tmp_path / "report"
    result = edge_kit_cli("bench", str(bundle), "--config", str(project / "edgekit.toml"), "--out", str(out),
                          "--quick", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc == load_report(out)
    engines = doc["engines"]
    assert list(engines) == ["int8", "fp32", "pytorch"] and doc["missing"] == {}
    # The run's own files, from its local folder, not copies of something else.
    assert engines["fp32"]["model_file"] == str(run.onnx)
    assert engines["pytorch"]["model_file"] == str(run.checkpoint)
    assert engines["pytorch"]["model_bytes"] == Path(run.checkpoint).stat().st_size
    # The held-out split: the same accuracy the training run measured for this checkpoint.
    assert doc["data"]["labelled"] and doc["data"]["n"] == 360
    test_accuracy = run.metrics["test_accuracy"]
    assert engines["pytorch"]["accuracy"] == pytest.approx(test_accuracy, abs=1e-9)
    assert engines["fp32"]["accuracy"] == pytest.approx(test_accuracy, abs=1 / 360)
    assert abs(engines["int8"]["accuracy"] - test_accuracy) < 0.05
    assert doc["notes"] == []
    for e in engines.values():
        for lat in e["latency_ms"]:
            assert lat["p50"] <= lat["p95"] <= lat["p99"]

    assert doc["mlflow"]["logged"] is True
    client = MlflowClient(tracking_uri=run.tracking_uri)
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["bench.pytorch.accuracy"] == pytest.approx(engines["pytorch"]["accuracy"])
    assert np.isclose(metrics["bench.int8.model_bytes"], engines["int8"]["model_bytes"])
