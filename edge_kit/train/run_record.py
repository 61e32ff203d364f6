"""What a training run records, the same for both engines: its training fingerprint (what decides the
weights), its MLflow tags at the start, a note when it resumes on other code, how it ended, and at the end
its run folder (final `.pt`, checked fp32 ONNX, the resolved config, provenance, split and preprocessing)
logged as the run's artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from device_agent.atomic import atomic_write_bytes
from edge_kit.config import Config
from edge_kit.train import tracking
from edge_kit.train.checkpoint import atomic_torch_save
from edge_kit.train.data import Dataset
from edge_kit.train.export import export_and_check
from edge_kit.train.models import count_parameters
from edge_kit.train.trainer import Trainer, evaluate

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final.pt"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    checkpoint: Path  # final .pt
    onnx: Path  # fp32 ONNX, dynamic batch, input "input", output "logits"
    metrics: dict[str, Any]  # final test accuracy etc.
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.tracking_uri,
            "checkpoint": str(self.checkpoint),
            "onnx": str(self.onnx),
            "metrics": self.metrics,
            "reused": self.reused,
        }


def run_folder(config: Config, run_id: str) -> Path:
    return config.workdir / "runs" / run_id


def training_fingerprint(config: Config, dataset: Dataset, device: torch.device) -> str:
    """What decides the trained weights: data, model and optimisation settings, the snapshot, the device type.

    Checkpoint interval, retention and storage are left out: they change when and where state is saved,
    not what is computed. The engine and worker count stay in: data-parallel ranks see other batches.
    """
    train = {k: v for k, v in config.to_dict()["train"].items()
             if k not in ("checkpoint_every", "keep_checkpoints", "storage")}
    train["threads"] = torch.get_num_threads()  # "0" means the machine's default, which differs between machines
    doc = {"data": config.to_dict()["data"], "model": config.to_dict()["model"], "train": train,
           "device": device.type, "data_md5": dataset.snapshot.dvc_md5, "split": dataset.split_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def run_tags(config: Config, trainer: Trainer, provenance: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """The tags a new MLflow run starts with: provenance legs, fingerprints, device and model size."""
    return {**tracking.provenance_tags(provenance), tracking.TAG_FINGERPRINT: config.fingerprint(),
            tracking.TAG_TRAINING_FINGERPRINT: fingerprint, "edgekit.device": trainer.device.type,
            "edgekit.parameters": str(count_parameters(trainer.model))}


def mark_run(run: tracking.RunHandle, status: str) -> None:
    """Record how the run ended without hiding the error that ended it (the store may be the problem)."""
    try:
        run.finish(status)
    except Exception as exc:  # MLflow/SQLAlchemy errors vary; the original error matters more
        log.warning("could not mark MLflow run %s as %s: %s", run.run_id, status, exc)


def record_provenance_drift(run: tracking.RunHandle, provenance: dict[str, Any]) -> None:
    """A run resumed on other code or another environment no longer comes from one clean commit: say so.

    Its `edgekit.git_dirty` tag becomes "true", so `train(reuse=True)` never hands it out as the model of a
    commit; what changed is kept in `edgekit.resumed_with`.
    """
    tags = run.client.get_run(run.run_id).data.tags
    now = tracking.provenance_tags(provenance)
    keys = (tracking.TAG_COMMIT, tracking.TAG_DIRTY, tracking.TAG_LOCK)
    changed = {k: now[k] for k in keys if tags.get(k) != now[k]}
    if not changed:
        return
    log.warning("resuming MLflow run %s with different code or environment (%s); the run is marked dirty",
                run.run_id, ", ".join(f"{k.removeprefix('edgekit.')}={v[:12]}" for k, v in changed.items()))
    run.set_tags({tracking.TAG_DIRTY: "true", "edgekit.resumed_with": json.dumps(changed, sort_keys=True)})


def finish_run(config: Config, dataset: Dataset, trainer: Trainer, run: tracking.RunHandle,
            provenance: dict[str, Any], fingerprint: str) -> TrainResult:
    folder = run_folder(config, run.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = {**trainer.state(run.run_id, fingerprint), "format": "edgekit.checkpoint/1", "completed": True}
    checkpoint = folder / FINAL_CHECKPOINT
    atomic_torch_save(final, checkpoint)
    model = trainer.model.to("cpu").eval()
    held_out = dataset.preprocess(dataset.X_test)
    exported = export_and_check(model, dataset.input_shape, folder / ONNX_FILE, held_out)
    metrics = {
        "test_accuracy": evaluate(model, torch.from_numpy(held_out), torch.from_numpy(dataset.y_test)),
        "onnx_max_abs_diff": exported.max_abs_diff,
        "steps": float(trainer.position.global_step),
        "epochs": float(config.train.epochs),
    }
    # test_accuracy is already in the per-epoch history (the last epoch's value is this one).
    run.log_metrics({k: v for k, v in metrics.items() if k != "test_accuracy"}, step=config.train.epochs)
    _write_json(folder / "config.json", config.to_dict(), indent=2, sort_keys=True)
    _write_json(folder / "provenance.json", provenance, indent=2, sort_keys=True)
    _write_json(folder / "split.json", {"train_ids": dataset.train_ids.tolist(), "test_ids": dataset.test_ids.tolist(),
                                        "dvc_md5": dataset.snapshot.dvc_md5, "seed": config.data.seed})
    _write_json(folder / "preprocessing.json", {
        "preprocessing": dataset.preprocessing, "labels": dataset.labels, "input_shape": list(dataset.input_shape),
        "input_kind": dataset.input_kind, "feature_names": dataset.feature_names}, indent=2)
    run.log_artifact(checkpoint, "model")
    run.log_artifact(folder / ONNX_FILE, "model")
    for name in ("config.json", "provenance.json", "split.json", "preprocessing.json"):
        run.log_artifact(folder / name, "meta")
    run.log_artifact(config.path, "meta")
    run.set_tags({tracking.TAG_COMPLETED: "true"})
    run.finish("FINISHED")
    return TrainResult(run.run_id, run.experiment_id, run.tracking_uri, checkpoint, folder / ONNX_FILE, metrics,
                       reused=False)


def _write_json(path: Path, doc: Any, **dumps: Any) -> None:
    """Atomically: a crash mid-write leaves the previous file or none, never a truncated one to read back."""
    atomic_write_bytes(path, (json.dumps(doc, default=str, **dumps) + "\n").encode(), mode=0o644)
