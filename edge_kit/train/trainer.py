"""The training loop: seeded, deterministic and resumable; shared by the local engine and Ray's workers.

Bitwise resume: everything that decides the next step is either derived from the config (the data
order of epoch e is a permutation drawn from a generator seeded by (seed, e)) or saved in the
checkpoint (model, optimizer, scheduler, every RNG state, position in the epoch, running loss). So a
run killed at any step and resumed from its newest checkpoint repeats exactly the steps it lost and
ends with weights bitwise equal to an uninterrupted run on the same machine and thread count.

SIGTERM (spot preemption) sets a flag; after the current step a checkpoint is written and
TrainingInterrupted (exit 75) is raised. What runs the loop (MLflow run, checkpoints, reuse, Ray) is
`edge_kit.train.run`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_kit.config import Config
from edge_kit.errors import ConfigError, TrainingInterrupted
from edge_kit.train.data import Dataset
from edge_kit.train.models import build_model, model_signature

log = logging.getLogger(__name__)


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
