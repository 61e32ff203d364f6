"""`train`: a config in, a finished MLflow run with its checkpoint and fp32 ONNX out.

One training per project at a time (`project_lock`); a FINISHED run of the same training fingerprint,
clean commit and data is reused when asked (`edge-kit build`); else the steps run here (the local
engine: checkpoints in `.edgekit/checkpoints`, `--resume auto` from the newest valid one) or on Ray
(`train.engine = "ray"`, `edge_kit.train.ray_engine`). Both end through `edge_kit.train.run_record`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from edge_kit.config import Config
from edge_kit.errors import TrainingInterrupted, UsageError
from edge_kit.train import tracking
from edge_kit.train.checkpoint import CheckpointManager, LoadedCheckpoint, check_signature
from edge_kit.train.data import Dataset, load_dataset
from edge_kit.train.models import resolve_factory
from edge_kit.train.provenance import collect_provenance
from edge_kit.train.run_record import (
    FINAL_CHECKPOINT,
    ONNX_FILE,
    TrainResult,
    finish_run,
    mark_run,
    record_provenance_drift,
    run_folder,
    run_tags,
    training_fingerprint,
)
from edge_kit.train.trainer import Trainer, deterministic_algorithms, select_device, sigterm_flag

log = logging.getLogger(__name__)


def train(config: Config, *, resume: str = "auto", tracking_uri: str | None = None,
          reuse: bool = False, ray_address: str | None = None) -> TrainResult:
    """Train (resuming from the newest valid checkpoint), track it in MLflow and export a checked fp32 ONNX.

    reuse=True (used by `edge-kit build`): return the newest FINISHED MLflow run whose training
    fingerprint, git commit (clean tree) and data md5 equal the current ones, if its artifacts exist.
    With `train.engine = "ray"` the steps run on Ray (``ray_address``, else RAY_ADDRESS, else a local
    instance); everything before and after them (MLflow run, export, artifacts) is the same code.
    """
    if resume not in ("auto", "never"):
        raise UsageError(f"--resume must be 'auto' or 'never', got {resume!r}")
    if ray_address and config.train.engine != "ray":
        raise UsageError("--ray-address needs `[train] engine = \"ray\"` in the config",
                         hint="set train.engine = \"ray\" (the local engine trains in this process)")
    with project_lock(config.ensure_workdir()), deterministic_algorithms(config.train.threads):
        return _train(config, resume=resume, tracking_uri=tracking_uri, reuse=reuse, ray_address=ray_address)


@contextmanager
def project_lock(workdir: Path) -> Iterator[None]:
    """One training per project at a time: two would write the same checkpoints and split the same runs.

    An flock, so the kernel releases it when the holder dies, SIGKILL included: no stale lock to clean up.
    """
    import fcntl

    path = workdir / "train.lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UsageError(f"another edge-kit training is running in this project (pid {holder}, lock {path})",
                             hint="wait for it to finish, or stop it (it checkpoints on SIGTERM)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _reusable(config: Config, dataset: Dataset, provenance: dict[str, Any], fingerprint: str,
              client: Any, experiment_id: str, uri: str) -> TrainResult | None:
    git = provenance["git"]
    if not git["commit"] or git["dirty"]:
        log.info("not reusing a previous run: the git tree is %s", "dirty" if git["commit"] else "not a repository")
        return None
    for run in tracking.find_reusable_runs(client, experiment_id, fingerprint=fingerprint, commit=git["commit"],
                                           data_md5=dataset.snapshot.dvc_md5):
        run_id = run.info.run_id
        folder = run_folder(config, run_id)
        checkpoint = folder / FINAL_CHECKPOINT
        onnx = folder / ONNX_FILE
        if not checkpoint.is_file():
            checkpoint = tracking.artifact_local_path(client, uri, run_id, tracking.CHECKPOINT_ARTIFACT, folder) \
                or checkpoint
        if not onnx.is_file():
            onnx = tracking.artifact_local_path(client, uri, run_id, tracking.ONNX_ARTIFACT, folder) or onnx
        if checkpoint.is_file() and onnx.is_file():
            log.info("reusing MLflow run %s: same training config, clean commit %s and data md5", run_id,
                     git["commit"][:12])
            metrics = {k: v for k, v in run.data.metrics.items()}
            return TrainResult(run_id, experiment_id, uri, checkpoint, onnx, metrics, reused=True)
        log.info("run %s matches but its artifacts are gone; not reusing it", run_id)
    return None


def _train(config: Config, *, resume: str, tracking_uri: str | None, reuse: bool,
           ray_address: str | None = None) -> TrainResult:
    resolve_factory(config)  # an unimportable factory fails before any work
    dataset = load_dataset(config)
    # On Ray the workers hold the device: the driver may have no GPU even when they do.
    ray_engine = config.train.engine == "ray"
    device = torch.device("cuda" if config.train.use_gpu else "cpu") if ray_engine \
        else select_device(config.train.device)
    provenance = collect_provenance(config, dataset)
    uri = tracking.resolve_tracking_uri(config, tracking_uri)
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, config, uri)
    # With Ray this Trainer only rebuilds the model for the signature and, at the end, the export.
    trainer = Trainer(config, dataset, torch.device("cpu") if ray_engine else device)
    fingerprint = training_fingerprint(config, dataset, device)
    if reuse:
        found = _reusable(config, dataset, provenance, fingerprint, client, experiment_id, uri)
        if found is not None:
            return found
    if ray_engine:
        from edge_kit.train.ray_engine import train_on_ray

        return train_on_ray(config, dataset, trainer, provenance, client, experiment_id, uri, fingerprint,
                            resume=resume, address=ray_address)
    return train_locally(config, dataset, trainer, provenance, client, experiment_id, uri, fingerprint,
                         resume=resume)


def train_locally(config: Config, dataset: Dataset, trainer: Trainer, provenance: dict[str, Any], client: Any,
                  experiment_id: str, uri: str, fingerprint: str, *, resume: str) -> TrainResult:
    """The local engine: the loop in this process, checkpoints in `.edgekit/checkpoints`, SIGTERM -> exit 75."""
    checkpoints = CheckpointManager(config.workdir / "checkpoints", config.train.keep_checkpoints)
    latest: LoadedCheckpoint | None = None
    if resume == "auto":
        latest = checkpoints.latest_valid()
        if latest is not None:
            check_signature(latest.path, latest.state["signature"], trainer.signature)
            check_signature(latest.path, {"training config": latest.state.get("training_fingerprint")},
                            {"training config": fingerprint})
    else:
        archived = checkpoints.archive("replaced")
        if archived is not None:
            log.info("--resume never: previous checkpoints moved to %s", archived)

    run = None
    if latest is not None:
        trainer.restore(latest.state)
        run = tracking.resume_run(client, str(latest.state.get("mlflow_run_id")), uri)
        log.info("resuming from %s (step %d, epoch %d)", latest.path.name, trainer.position.global_step,
                 trainer.position.epoch + 1)
        if run is not None:
            record_provenance_drift(run, provenance)
    if run is None:
        run = tracking.start_run(client, experiment_id, uri, config, run_tags(config, trainer, provenance, fingerprint))
    log.info("MLflow run %s (experiment %s, %s)", run.run_id, experiment_id, uri)
    assert run is not None
    handle = run

    def save() -> Path:
        return checkpoints.save(trainer.state(handle.run_id, fingerprint))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        handle.log_metrics(metrics, step=epoch + 1)

    started = time.perf_counter()
    try:
        with sigterm_flag() as stop:
            trainer.run(save=save, on_epoch=on_epoch, stop=stop, flush=checkpoints.flush)
        checkpoints.close()
        result = finish_run(config, dataset, trainer, handle, provenance, fingerprint)
    except TrainingInterrupted:
        checkpoints.close(raise_errors=False)
        mark_run(handle, "KILLED")
        raise
    except BaseException:
        checkpoints.close(raise_errors=False)
        mark_run(handle, "FAILED")
        raise
    log.info("training done in %.1f s: test accuracy %.4f", time.perf_counter() - started,
             result.metrics["test_accuracy"])
    # The run is complete and its final state is stored with it: the step checkpoints have served.
    shutil.rmtree(checkpoints.folder, ignore_errors=True)
    return result
