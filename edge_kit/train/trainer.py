"""Training: seeded, deterministic, resumable PyTorch training tracked in MLflow, ending in a checked fp32 ONNX.

Bitwise resume: everything that decides the next step is either derived from the config (the data
order of epoch e is a permutation drawn from a generator seeded by (seed, e)) or saved in the
checkpoint (model, optimizer, scheduler, every RNG state, position in the epoch, running loss). So a
run killed at any step and resumed from its newest checkpoint repeats exactly the steps it lost and
ends with weights bitwise equal to an uninterrupted run on the same machine and thread count.

SIGTERM (spot preemption) sets a flag; after the current step a checkpoint is written and
TrainingInterrupted (exit 75) is raised. `--resume auto` continues from the newest valid checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_kit.config import Config
from edge_kit.errors import ConfigError, TrainingInterrupted, UsageError
from edge_kit.train import tracking
from edge_kit.train.checkpoint import (
    CheckpointManager,
    LoadedCheckpoint,
    atomic_torch_save,
    check_signature,
    read_checkpoint,
)
from edge_kit.train.data import Dataset, load_dataset
from edge_kit.train.export import export_and_check
from edge_kit.train.models import architecture_signature, build_model, count_parameters, resolve_factory
from edge_kit.train.provenance import collect_provenance

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


# --- determinism -------------------------------------------------------------------------------

def select_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "'cuda' was asked for but no CUDA device is available",
                          hint="use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA generators too


@contextmanager
def deterministic_algorithms(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed CPU thread count while training; the caller's settings come back after.

    The thread count matters: CPU reductions split across a different number of threads add up in a
    different order, so a resumed run must use the same count as the run it continues.
    """
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
        torch.set_num_threads(previous[2])


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of one epoch: a pure function of (seed, epoch), so a resume reproduces it exactly."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def shard_order(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """One rank's share of an epoch's order (data-parallel training; the whole order for one process).

    Padded by wrapping around to a multiple of the world size, as torch's DistributedSampler does, so
    every rank takes the same number of steps and DDP's collectives always have all ranks present.
    """
    if world_size == 1:
        return order
    total = math.ceil(len(order) / world_size) * world_size
    padded = order.repeat(math.ceil(total / len(order)))[:total]  # repeat: fewer rows than ranks works too
    return padded[rank::world_size]


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def model_signature(config: Config, model: torch.nn.Module, input_shape: tuple[int, ...],
                    num_classes: int) -> dict[str, Any]:
    """Identity of a model: two checkpoints with equal signatures hold interchangeable weights."""
    doc = {"factory": config.model.factory, "kwargs": config.model.kwargs, "input_shape": list(input_shape),
           "num_classes": num_classes, "architecture": [[n, list(s)] for n, s in architecture_signature(model)]}
    return json.loads(json.dumps(doc, sort_keys=True, default=str))  # plain lists/dicts: comparable after a load


# --- SIGTERM -----------------------------------------------------------------------------------

class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def sigterm_flag() -> Iterator[StopFlag]:
    """Turn SIGTERM into a flag the loop checks after each step (only possible in the main thread)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: Any) -> None:
        flag.signal = signum

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- progress ----------------------------------------------------------------------------------

class Progress:
    """A tqdm bar (loss, samples/s) on a terminal; plain log lines per epoch otherwise."""

    def __init__(self, total_steps: int, done_steps: int) -> None:
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, loss: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:,.0f}", refresh=False)
            self.bar.update(1)

    def epoch(self, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        text = (f"epoch {epoch + 1}/{epochs}: train_loss {metrics['train_loss']:.4f} "
                f"test_accuracy {metrics['test_accuracy']:.4f} {metrics['throughput']:,.0f} samples/s")
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the loop ----------------------------------------------------------------------------------

@dataclass
class Position:
    epoch: int = 0
    batch: int = 0  # next batch within the epoch
    global_step: int = 0
    loss_sum: float = 0.0  # running sum over the epoch so far (for the epoch's mean train loss)
    seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "loss_sum": self.loss_sum, "seen": self.seen}


def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            correct += int((model(X[start:start + batch_size]).argmax(dim=1) == y[start:start + batch_size]).sum())
    model.train()
    return correct / max(1, len(X))


class Trainer:
    """The training loop shared by both engines: the local one (one process) and Ray (one per rank, DDP).

    Every rank seeds the same way and takes equal-sized batches, so their RNG states stay equal and
    rank 0's checkpoint restores all of them. ``forward_model`` is what the loop calls: the model
    itself, or a DistributedDataParallel wrapper around it (which averages the gradients across ranks).
    """

    def __init__(self, config: Config, dataset: Dataset, device: torch.device, *, rank: int = 0,
                 world_size: int = 1) -> None:
        self.config = config
        self.dataset = dataset
        self.device = device
        self.rank = rank
        self.world_size = world_size
        seed_everything(config.train.seed)
        self.model = build_model(config, dataset.input_shape, dataset.num_classes).to(device)
        self.forward_model: torch.nn.Module = self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.train.lr)
        shard = math.ceil(len(dataset.X_train) / world_size)
        self.steps_per_epoch = math.ceil(shard / config.train.batch_size)
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps)
        self.X_train = torch.from_numpy(dataset.preprocess(dataset.X_train)).to(device)
        self.y_train = torch.from_numpy(dataset.y_train).to(device)
        self.X_test = torch.from_numpy(dataset.preprocess(dataset.X_test)).to(device)
        self.y_test = torch.from_numpy(dataset.y_test).to(device)
        self.position = Position()
        self.signature = model_signature(config, self.model, dataset.input_shape, dataset.num_classes)

    def state(self, run_id: str, fingerprint: str) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "training_fingerprint": fingerprint,
            "mlflow_run_id": run_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "data_order": {"seed": self.config.train.seed, "epoch": self.position.epoch},
            "position": self.position.to_dict(),
            "meta": {"input_shape": list(self.dataset.input_shape), "labels": list(self.dataset.labels),
                     "preprocessing": self.dataset.preprocessing, "input_kind": self.dataset.input_kind,
                     "feature_names": list(self.dataset.feature_names)},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        p = state["position"]
        self.position = Position(int(p["epoch"]), int(p["batch"]), int(p["global_step"]), float(p["loss_sum"]),
                                 int(p["seen"]))

    @property
    def finished(self) -> bool:
        return self.position.epoch >= self.config.train.epochs

    def run(self, *, save: Any, on_epoch: Any, stop: StopFlag, flush: Any = lambda: None) -> None:
        """Train from the current position to the end.

        ``save()`` queues a checkpoint, ``flush()`` waits until it is on disk, ``on_epoch`` logs metrics.
        """
        cfg = self.config.train
        n = len(self.X_train)
        progress = Progress(self.total_steps, self.position.global_step)
        self.model.train()
        try:
            while not self.finished:
                pos = self.position
                order = shard_order(epoch_order(cfg.seed, pos.epoch, n), self.rank, self.world_size).to(self.device)
                epoch_started = time.perf_counter()
                samples_this_session = 0
                while pos.batch < self.steps_per_epoch:
                    step_started = time.perf_counter()
                    idx = order[pos.batch * cfg.batch_size:(pos.batch + 1) * cfg.batch_size]
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(self.forward_model(self.X_train[idx]), self.y_train[idx])
                    loss.backward()
                    self.optimizer.step()
                    self.scheduler.step()
                    loss_value = float(loss.detach())
                    pos.batch += 1
                    pos.global_step += 1
                    pos.loss_sum += loss_value * len(idx)
                    pos.seen += len(idx)
                    samples_this_session += len(idx)
                    progress.step(loss_value, len(idx) / max(time.perf_counter() - step_started, 1e-9))
                    if stop:
                        path = save()
                        flush()
                        raise TrainingInterrupted(
                            f"training stopped by signal {stop.signal} at step {pos.global_step} "
                            f"(epoch {pos.epoch + 1}); checkpoint saved to {path}",
                            hint="run the same command again (--resume auto) to continue from it")
                    if pos.global_step % cfg.checkpoint_every == 0 and pos.batch < self.steps_per_epoch:
                        save()
                elapsed = time.perf_counter() - epoch_started
                metrics = {
                    "train_loss": pos.loss_sum / max(1, pos.seen),
                    "test_accuracy": evaluate(self.model, self.X_test, self.y_test),
                    "throughput": samples_this_session / max(elapsed, 1e-9),
                    "lr": float(self.scheduler.get_last_lr()[0]),
                }
                self.position = Position(pos.epoch + 1, 0, pos.global_step)
                save()
                on_epoch(pos.epoch, metrics)
                progress.epoch(pos.epoch, cfg.epochs, metrics)
        finally:
            progress.close()


# --- orchestration -------------------------------------------------------------------------------

def run_folder(config: Config, run_id: str) -> Path:
    return config.workdir / "runs" / run_id


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
    resolved = folder / "config.json"
    resolved.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")
    (folder / "split.json").write_text(json.dumps(
        {"train_ids": dataset.train_ids.tolist(), "test_ids": dataset.test_ids.tolist(),
         "dvc_md5": dataset.snapshot.dvc_md5, "seed": config.data.seed}) + "\n")
    (folder / "preprocessing.json").write_text(json.dumps(
        {"preprocessing": dataset.preprocessing, "labels": dataset.labels, "input_shape": list(dataset.input_shape),
         "input_kind": dataset.input_kind, "feature_names": dataset.feature_names}, indent=2) + "\n")
    run.log_artifact(checkpoint, "model")
    run.log_artifact(folder / ONNX_FILE, "model")
    for name in ("config.json", "provenance.json", "split.json", "preprocessing.json"):
        run.log_artifact(folder / name, "meta")
    run.log_artifact(config.path, "meta")
    run.set_tags({tracking.TAG_COMPLETED: "true"})
    run.finish("FINISHED")
    return TrainResult(run.run_id, run.experiment_id, run.tracking_uri, checkpoint, folder / ONNX_FILE, metrics,
                       reused=False)


def load_trained_model(config: Config, checkpoint: Path) -> torch.nn.Module:
    """Rebuild the module a checkpoint holds, in eval mode on the CPU.

    Raises UsageError (exit 2) when the file is unreadable or holds a different model than the config builds.
    """
    try:
        state = read_checkpoint(Path(checkpoint))
    except FileNotFoundError:
        raise UsageError(f"checkpoint {checkpoint} does not exist") from None
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from exc
    meta = state.get("meta", {})
    found = state["signature"]
    input_shape = tuple(int(d) for d in found.get("input_shape", meta.get("input_shape", ())))
    num_classes = int(found.get("num_classes", len(meta.get("labels", []))))
    model = build_model(config, input_shape, num_classes)
    check_signature(Path(checkpoint), found, model_signature(config, model, input_shape, num_classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {checkpoint} does not fit the configured model: {exc}") from exc
    return model.eval()

