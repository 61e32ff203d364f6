"""`[train] engine = "ray"`: the same training loop on a Ray cluster, data-parallel, surviving lost workers.

Ray Train's TorchTrainer starts `workers` processes; each runs `Trainer` (the local engine's loop) on its
shard of the epoch order (a function of (seed, epoch), split by rank) with DistributedDataParallel
(gloo on CPU, NCCL on GPU). So a run is a function of the config and the worker count.

Checkpoints: rank 0 writes the local engine's `.pt` (model, optimizer, scheduler, RNG states, position)
and hands it to `ray.train.report`, which copies it to `storage/<run name>/`, keeping the newest few.
- A worker that dies (SIGKILL, lost spot node) makes Ray restart the whole group from the newest
  checkpoint (`FailureConfig(max_failures)`); the lost steps are repeated exactly.
- A driver that dies takes the job with it. Started again with the same config, it finds the same run
  name (derived from the training fingerprint) in storage, where Ray's own snapshot names the newest
  checkpoint, and `edgekit-run.json` names the MLflow run to continue.

The driver opens the MLflow run and, when the workers are done, finishes it exactly as the local engine
does (final `.pt`, checked fp32 ONNX, artifacts); rank 0 logs the per-epoch metrics into it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_kit.config import Config
from edge_kit.errors import EdgeKitError, UsageError
from edge_kit.train import tracking
from edge_kit.train.checkpoint import (
    FORMAT,
    CheckpointManager,
    LoadedCheckpoint,
    atomic_torch_save,
    check_signature,
    checkpoint_name,
    detached_copy,
)
from edge_kit.train.data import Dataset
from edge_kit.train.ray_cluster import connected
from edge_kit.train.run_record import TrainResult, finish_run, mark_run, record_provenance_drift, run_tags
from edge_kit.train.trainer import StopFlag, Trainer, deterministic_algorithms

log = logging.getLogger(__name__)

RUN_RECORD = "edgekit-run.json"
# Restarts of the worker group a run may take (lost workers, preempted nodes) before it fails.
MAX_FAILURES = 3


class RayTrainingFailed(EdgeKitError):
    """Ray gave up on the run (more worker failures than allowed, or an error in the loop); exit 1."""


def storage_uri(config: Config) -> str:
    """Where the run's checkpoints go: `train.storage` (a path relative to the config, or a URI such as
    s3://bucket/prefix that pyarrow understands), else `.edgekit/ray/`."""
    storage = config.train.storage
    if "://" in storage:
        return storage
    return str(config.resolve(storage) if storage else config.ensure_workdir() / "ray")


def run_name(fingerprint: str) -> str:
    """One name per training fingerprint: the same config finds its run again, a changed one starts fresh."""
    return f"edgekit-{fingerprint[:16]}"


class RunStorage:
    """The run's folder in `storage`, through pyarrow's filesystems (local path, s3://, gs://, ...)."""

    def __init__(self, uri: str, name: str) -> None:
        from pyarrow import fs

        self.fs, root = fs.FileSystem.from_uri(uri)
        self.root = root.rstrip("/")
        self.folder = f"{self.root}/{name}"

    def read_record(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.folder}/{RUN_RECORD}") as f:
                return dict(json.loads(f.read()))
        except FileNotFoundError:
            return None

    def write_record(self, record: dict[str, Any]) -> None:
        self.fs.create_dir(self.folder, recursive=True)
        tmp = f"{self.folder}/.{RUN_RECORD}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, sort_keys=True).encode())
        self.fs.move(tmp, f"{self.folder}/{RUN_RECORD}")

    def exists(self) -> bool:
        from pyarrow import fs

        return bool(self.fs.get_file_info(self.folder).type != fs.FileType.NotFound)

    def archive(self, reason: str) -> str | None:
        """Move the run's folder aside (nothing is deleted) so a fresh run starts empty."""
        if not self.exists():
            return None
        index = 1
        while self.fs.get_file_info(target := f"{self.folder}-{reason}-{index}").type.name != "NotFound":
            index += 1
        self.fs.move(self.folder, target)
        return target

    def delete(self) -> None:
        self.fs.delete_dir(self.folder)


def read_latest(folder: Path) -> LoadedCheckpoint:
    """The `.pt` inside one Ray checkpoint folder."""
    loaded = CheckpointManager(folder, keep=1, background=False).latest_valid()
    if loaded is None:
        raise RayTrainingFailed(f"Ray checkpoint {folder} holds no readable edge-kit checkpoint")
    return loaded


def train_on_ray(config: Config, dataset: Dataset, trainer: Trainer, provenance: dict[str, Any], client: Any,
                 experiment_id: str, uri: str, fingerprint: str, *, resume: str,
                 address: str | None) -> TrainResult:
    """Run the steps on Ray, then finish the MLflow run on the driver as the local engine does."""
    require_ray()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = config.train
    uri_storage = storage_uri(config)
    name = run_name(fingerprint)
    storage = RunStorage(uri_storage, name)
    if resume == "never":
        archived = storage.archive("replaced")
        if archived is not None:
            log.info("--resume never: the previous Ray run moved to %s", archived)
    record = storage.read_record()
    run = None
    if record is not None:
        run = tracking.resume_run(client, str(record["mlflow_run_id"]), uri)
        if run is not None:
            log.info("resuming Ray run %s from %s (MLflow run %s)", name, storage.folder, run.run_id)
            record_provenance_drift(run, provenance)
    if run is None:
        tags = {**run_tags(config, trainer, provenance, fingerprint),
                "edgekit.device": "cuda" if cfg.use_gpu else "cpu", "edgekit.engine": "ray",
                "edgekit.workers": str(cfg.workers), "edgekit.ray_version": ray.__version__}
        run = tracking.start_run(client, experiment_id, uri, config, tags)
        storage.write_record({"mlflow_run_id": run.run_id, "training_fingerprint": fingerprint})
    log.info("MLflow run %s (experiment %s, %s); Ray storage %s", run.run_id, experiment_id, uri, storage.folder)

    loop_config = {"config": config, "dataset": dataset, "run_id": run.run_id, "tracking_uri": uri,
                   "fingerprint": fingerprint}
    try:
        with connected(address, cfg.workers):
            ray_trainer = TorchTrainer(
                worker_loop,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
                run_config=RunConfig(name=name, storage_path=uri_storage,
                                     failure_config=FailureConfig(max_failures=MAX_FAILURES),
                                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
            )
            result = ray_trainer.fit()
            if result.checkpoint is None:
                raise RayTrainingFailed(f"the Ray run {name} ended without a checkpoint")
            with result.checkpoint.as_directory() as folder:
                final = read_latest(Path(folder))
        check_signature(final.path, final.state["signature"], trainer.signature)
        trainer.restore(final.state)
        if not trainer.finished:
            raise RayTrainingFailed(f"the Ray run {name} stopped at step {final.step}, before the last epoch")
        done = finish_run(config, dataset, trainer, run, provenance, fingerprint)
    except EdgeKitError:
        mark_run(run, "FAILED")
        raise
    except Exception as exc:  # ray.train.TrainingFailedError and what the workers raised
        mark_run(run, "FAILED")
        raise RayTrainingFailed(f"Ray training failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}",
                                hint=f"checkpoints are kept in {storage.folder}; run the same command again "
                                     "to continue from the newest") from exc
    except BaseException:
        mark_run(run, "KILLED")
        raise
    # The run is complete and its final state is stored with it: the step checkpoints have served.
    storage.delete()
    return done


def worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: restore the newest checkpoint, wrap the model in DDP, run the shared loop."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    config: Config = loop_config["config"]
    fingerprint: str = loop_config["fingerprint"]
    run_id: str = loop_config["run_id"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.train.use_gpu else torch.device("cpu")
    with deterministic_algorithms(config.train.threads):
        trainer = Trainer(config, writable(loop_config["dataset"]), device, rank=rank, world_size=world_size)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                loaded = read_latest(Path(folder))
            check_signature(loaded.path, loaded.state["signature"], trainer.signature)
            check_signature(loaded.path, {"training config": loaded.state.get("training_fingerprint")},
                            {"training config": fingerprint})
            trainer.restore(loaded.state)
        if world_size > 1:
            trainer.forward_model = DistributedDataParallel(
                trainer.model, device_ids=[device.index] if device.type == "cuda" else None)
        uri = loop_config.get("tracking_uri")  # None: no MLflow (benchmarks/check_ray_gpu.py)
        run = tracking.RunHandle(tracking.client_for(uri), run_id, "", uri) if rank == 0 and uri else None

        reporter = CheckpointReporter()
        every = config.train.checkpoint_every
        stored = {"step": trainer.position.global_step}  # the newest step handed to Ray

        def save() -> Path:
            # The loop calls this every `checkpoint_every` steps and at every epoch end; Ray gets a
            # checkpoint only when a multiple of `checkpoint_every` was passed since the last one it got
            # (and the final one), and at most one waits for Ray at a time (see CheckpointReporter).
            # Every rank takes the same decisions, so every rank reports the same number of times.
            position = trainer.position
            final = trainer.finished
            if not final and position.global_step // every <= stored["step"] // every:
                return reporter.last_path
            if not final and not reporter.free(world_size, device):
                return reporter.last_path  # tried again at the next call: the newest state wins
            stored["step"] = position.global_step
            # loop_s: this session's time in the training loop so far (benchmarks/bench_ray_train.py)
            reporter.submit(trainer.state(run_id, fingerprint) if rank == 0 else None,
                            {"global_step": position.global_step, "epoch": position.epoch,
                             "loop_s": time.perf_counter() - loop_started})
            return reporter.last_path

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            # A driver killed just after a checkpoint reached storage, but before Ray's snapshot named it,
            # resumes from the one before and repeats this epoch's end: its metrics are logged once.
            if run is not None and not any(m.step == epoch + 1
                                           for m in run.client.get_metric_history(run_id, "train_loss")):
                run.log_metrics(metrics, step=epoch + 1)

        loop_started = time.perf_counter()
        try:
            trainer.run(save=save, on_epoch=on_epoch, stop=StopFlag())
        finally:
            reporter.close()  # the final checkpoint reaches Ray before the worker says it is done


class CheckpointReporter:
    """Hands checkpoints to `ray.train.report` on a thread of its own, one at a time.

    Ray Train's controller takes one report per worker per poll (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    2 s by default), and `report` blocks until the previous one was taken: reported from the training
    loop, every checkpoint stopped training for up to a poll. Here the loop only takes a copy of the state
    (rank 0) and goes on; this thread writes the `.pt` into a folder of its own and reports it. While a
    report is still waiting, the next due checkpoint is skipped and tried again at the loop's next
    `save()` (the newest state wins): a crash repeats at most `checkpoint_every` steps or one poll's
    worth of steps, whichever is more, and bitwise as before (every stored checkpoint is exact).
    """

    def __init__(self) -> None:
        self.last_path = Path(tempfile.gettempdir()) / "edgekit-ray-checkpoint"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-report")
        self._pending: Future[None] | None = None

    def free(self, world_size: int, device: torch.device) -> bool:
        """Whether a new checkpoint may go now: rank 0's report thread is idle (its view, sent to all ranks)."""
        idle = self._pending is None or self._pending.done()
        if world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([1 if idle else 0], dtype=torch.int32, device=device)
            dist.broadcast(flag, src=0)
            idle = bool(int(flag.item()))
        return idle

    def submit(self, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        """Queue a report (rank 0 with the state, copied now; other ranks without) after the one in flight."""
        self._wait()
        snapshot = {"format": FORMAT, **detached_copy(state)} if state is not None else None
        if snapshot is not None:
            self.last_path = self.last_path.with_name(checkpoint_name(int(metrics["global_step"])))
        self._pending = self._pool.submit(self._report, snapshot, metrics)

    @staticmethod
    def _report(snapshot: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        if snapshot is None:
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix="edgekit-ckpt-"))
        try:
            atomic_torch_save(snapshot, folder / checkpoint_name(int(metrics["global_step"])))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # a failed report (storage unreachable) fails the worker: Ray restarts it

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


def writable(dataset: Dataset) -> Dataset:
    """The dataset with its arrays copied: those from Ray's object store are read-only, which torch warns of."""
    import dataclasses

    return dataclasses.replace(dataset, X_train=np.array(dataset.X_train), y_train=np.array(dataset.y_train),
                               X_test=np.array(dataset.X_test), y_test=np.array(dataset.y_test))


def require_ray() -> None:
    """A clear message when the `ray` extra is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError("train.engine = \"ray\" needs Ray", hint="pip install 'edge-kit[ray]'") from None
