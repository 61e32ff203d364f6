"""Training end to end in-process: result files, MLflow run contents, reuse, load_trained_model, refusals."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_kit.config import load_config
from edge_kit.train import checkpoint as ckpt
from edge_kit.train.checkpoint import CheckpointWriteError, ForeignCheckpointError, read_checkpoint
from edge_kit.train.data import load_dataset
from edge_kit.train.models import load_trained_model
from edge_kit.train.run import train
from edge_kit.train.run_record import TrainResult
from tests.helpers.training import commit_all, make_project, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # real MLflow store, DVC, ONNX Runtime


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    root = tmp_path_factory.mktemp("trained")
    config_path = make_project(root, tiny_config(epochs=2))
    load_dataset(load_config(config_path))  # records the snapshot, so the commit below is clean
    commit_all(root)
    return config_path, train(load_config(config_path))


def test_result_files_and_metrics(trained: tuple[Path, TrainResult]) -> None:
    config_path, result = trained
    assert result.checkpoint.is_file() and result.onnx.is_file() and not result.reused
    assert result.tracking_uri == f"sqlite:///{config_path.parent / '.edgekit' / 'mlflow.db'}"
    assert result.metrics["test_accuracy"] > 0.7  # two epochs of a tiny CNN; the example gets ~97 %
    assert result.metrics["onnx_max_abs_diff"] <= 1e-4
    assert result.metrics["steps"] == 2 * 23
    assert not (config_path.parent / ".edgekit" / "checkpoints").exists()  # step checkpoints served their turn
    json.dumps(result.to_dict())


def test_onnx_takes_preprocessed_input_and_agrees_with_the_checkpoint(trained: tuple[Path, TrainResult]) -> None:
    config_path, result = trained
    config = load_config(config_path)
    dataset = load_dataset(config)
    model = load_trained_model(config, result.checkpoint)
    assert not model.training
    x = dataset.preprocess(dataset.X_test)
    session = ort.InferenceSession(str(result.onnx), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(["logits"], {"input": x})[0]
    torch_logits = model(torch.from_numpy(x)).detach().numpy()
    assert np.max(np.abs(onnx_logits - torch_logits)) <= 1e-4
    # The ONNX model on the raw test split, preprocessed as the bundle will say, scores what training reported.
    assert float((onnx_logits.argmax(1) == dataset.y_test).mean()) == result.metrics["test_accuracy"]
    meta = read_checkpoint(result.checkpoint)["meta"]
    assert meta["preprocessing"] == dataset.preprocessing and meta["labels"] == dataset.labels


def test_mlflow_run_holds_config_metrics_provenance_artifacts(trained: tuple[Path, TrainResult],
                                                               tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config_path, result = trained
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.factory"] == "edge_kit.models:small_cnn"
    assert json.loads(params["model.kwargs"]) == {"channels": [4, 8], "dropout": 0.1, "hidden": 16}
    assert {"quantize.backend", "gate.max_drop", "monitor.bins", "data.source"} <= set(params)
    for metric in ("train_loss", "test_accuracy", "throughput"):
        history = client.get_metric_history(result.run_id, metric)
        assert [m.step for m in history] == [1, 2], metric  # one value per epoch
    tags = run.data.tags
    head = (config_path.parent / ".git" / "HEAD").read_text()
    assert len(tags["edgekit.git_commit"]) == 40 and head  # the commit the run trained at
    assert tags["edgekit.git_dirty"] == "false"
    assert tags["edgekit.data_md5"] == load_dataset(load_config(config_path)).snapshot.dvc_md5
    assert len(tags["edgekit.lock_sha256"]) == 64
    assert tags["edgekit.version.torch"] == torch.__version__.split("+")[0] or tags["edgekit.version.torch"]
    assert {"edgekit.version.onnxruntime", "edgekit.version.numpy", "edgekit.cuda"} <= set(tags)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    artifacts |= {a.path for a in client.list_artifacts(result.run_id, "meta")}
    assert {"model/final.pt", "model/model.onnx", "meta/config.json", "meta/provenance.json",
            "meta/split.json", "meta/edgekit.toml"} <= artifacts
    local = Path(client.download_artifacts(result.run_id, "model/model.onnx", str(tmp_path)))
    assert local.read_bytes() == result.onnx.read_bytes()


def test_reuse_returns_the_finished_run_of_a_clean_commit(trained: tuple[Path, TrainResult]) -> None:
    config_path, result = trained
    again = train(load_config(config_path), reuse=True)
    assert again.reused and again.run_id == result.run_id and again.onnx == result.onnx
    config_path.write_text(config_path.read_text() + "\n# an uncommitted edit\n")
    try:
        assert load_config(config_path).fingerprint() == load_config(config_path).fingerprint()
        from edge_kit.train.provenance import git_state

        assert git_state(config_path.parent)["dirty"] is True
        # A dirty tree cannot name the code it trained with: no reuse (training again would be honest).
        from edge_kit.train import run as train_module

        config = load_config(config_path)
        dataset = load_dataset(config)
        from edge_kit.train.provenance import collect_provenance

        assert train_module._reusable(config, dataset, collect_provenance(config, dataset), "x", None, "0",
                                      "") is None
    finally:
        commit_all(config_path.parent, "edit")


def test_load_model_refuses_a_different_model(trained: tuple[Path, TrainResult], tmp_path: Path) -> None:
    _, result = trained
    other = tmp_path / "edgekit.toml"
    other.write_text(tiny_config().replace("channels = [4, 8]", "channels = [4, 6]"))
    with pytest.raises(ForeignCheckpointError, match="different model") as info:
        load_trained_model(load_config(other), result.checkpoint)
    assert info.value.exit_code == 2 and "architecture" in str(info.value)


def test_full_disk_mid_training_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = make_project(tmp_path, tiny_config(epochs=1))
    real_save = torch.save
    calls: list[int] = []

    def fail_on_third(obj: Any, f: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", fail_on_third)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        train(load_config(config_path))
    folder = tmp_path / ".edgekit" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    assert read_checkpoint(folder / "ckpt-00000008.pt")["position"]["global_step"] == 8
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / '.edgekit' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    # Those checkpoints belong to this model: a config for another one is refused and nothing is touched.
    original = config_path.read_text()
    config_path.write_text(original.replace("hidden = 16", "hidden = 12"))
    with pytest.raises(ForeignCheckpointError, match="belongs to a different model or training setup") as info:
        train(load_config(config_path))
    assert info.value.exit_code == 2 and "--resume never" in str(info.value)
    config_path.write_text(original.replace("lr = 0.01", "lr = 0.02"))  # same model, other training settings
    with pytest.raises(ForeignCheckpointError, match="training config"):
        train(load_config(config_path))
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    config_path.write_text(original)
    commit = commit_all(tmp_path)  # the code changes between the failure and the resume
    resumed = train(load_config(config_path))  # --resume auto continues from step 8 in the same MLflow run
    assert resumed.run_id == runs[0].info.run_id and resumed.metrics["steps"] == 23
    tags = client.get_run(resumed.run_id).data.tags
    # Started outside any commit, finished at `commit`: not the model of one clean commit, so never reused.
    assert tags["edgekit.git_dirty"] == "true" and json.loads(tags["edgekit.resumed_with"])[
        "edgekit.git_commit"] == commit


def test_one_training_per_project(tmp_path: Path) -> None:
    import fcntl
    import os

    from edge_kit.errors import UsageError

    config = load_config(make_project(tmp_path, tiny_config(epochs=1)))
    (tmp_path / ".edgekit").mkdir()
    with (tmp_path / ".edgekit" / "train.lock").open("a+") as held:  # as a running `edge-kit train` holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write(str(os.getpid()))
        held.flush()
        with pytest.raises(UsageError, match=f"another edge-kit training is running .* .pid {os.getpid()}"):
            train(config)
    assert not (tmp_path / ".edgekit" / "checkpoints").exists()  # it stopped before touching anything

