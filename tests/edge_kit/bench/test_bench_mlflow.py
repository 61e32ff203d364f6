"""With a real MLflow store: the fp32 model comes from the bundle's run, and the report is logged back to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.bench_fixtures import TinyPipeline, rebundle


@pytest.mark.integration
def test_fp32_from_the_run_and_report_logged_to_it(edge_kit_cli, tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(tiny_pipeline.fp32_onnx), "model")
    client.log_artifact(run_id, str(tiny_pipeline.checkpoint), "checkpoints")
    client.set_terminated(run_id)
    bundle = rebundle(tiny_pipeline.bundle, tmp_path / "dist", provenance={
        "mlflow": {"tracking_uri": tracking_uri, "experiment_id": experiment, "run_id": run_id}})

    out = tmp_path / "report"
    result = edge_kit_cli("bench", str(bundle), "--out", str(out), "--quick", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    fp32 = doc["engines"]["fp32"]
    assert fp32["model_file"] == f"mlflow run {run_id}: model/model-fp32.onnx"
    assert fp32["model_bytes"] == tiny_pipeline.fp32_onnx.stat().st_size
    # No --config: the checkpoint is found, but there is no model code to load it into.
    assert "pytorch" in doc["missing"] and "--config" in doc["missing"]["pytorch"]

    assert doc["mlflow"] == {"logged": True, "tracking_uri": tracking_uri, "run_id": run_id, "artifact_path": "bench"}
    run = client.get_run(run_id)
    p50 = next(e["p50"] for e in doc["engines"]["int8"]["latency_ms"] if e["threads"] == 1)
    assert run.data.metrics["bench.int8.latency_p50_ms.t1"] == pytest.approx(p50)
    assert run.data.metrics["bench.fp32.model_bytes"] == fp32["model_bytes"]
    assert run.data.tags["bench.host.int8_isa"] == doc["host"]["int8_isa"]
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "bench")}
    assert {"report.json", "report.md", "latency.png", "throughput.png", "size_memory.png"} <= logged


@pytest.mark.integration
def test_unreachable_run_is_reported_not_fatal(edge_kit_cli, tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    missing_db = tmp_path / "gone" / "mlflow.db"
    bundle = rebundle(tiny_pipeline.bundle, tmp_path / "dist", provenance={
        "mlflow": {"tracking_uri": f"sqlite:///{missing_db}", "run_id": "0123abcd"}})
    out = tmp_path / "report"
    result = edge_kit_cli("bench", str(bundle), "--out", str(out), "--quick", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc["mlflow"]["logged"] is False and "does not exist" in doc["mlflow"]["reason"]
    assert not missing_db.exists()  # MLflow was not allowed to create an empty store there
    assert any("not taken from the MLflow run" in n for n in doc["notes"])
