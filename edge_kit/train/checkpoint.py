"""Training checkpoints: atomic writes, the newest few kept, corrupt ones skipped, foreign ones refused.

A checkpoint is one `.pt` file (`ckpt-<global step>.pt`) holding everything needed to continue
bitwise-identically: model, optimizer and scheduler state, every RNG state, the position in the
epoch's data order and the running loss of the epoch. It is loaded with `weights_only=True`
(tensors and plain Python values only), so a checkpoint file can never execute code.

Writes go to a temp file in the same folder, are fsynced, then renamed over: a crash or a full disk
mid-write leaves the previous checkpoint untouched and no half-written file under a real name.

Writing happens on a background thread so training does not wait for the disk: `save` takes a copy of
the state (cheap: tensors are cloned in memory) and at most one write is in flight. A failed write is
raised by the next `save` or by `flush`, which training calls before it reports success or exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from device_agent.atomic import atomic_file
from edge_kit.errors import EdgeKitError, UsageError

log = logging.getLogger(__name__)

FORMAT = "edgekit.checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
REQUIRED_KEYS = ("format", "signature", "model", "optimizer", "scheduler", "rng", "position")


class CheckpointWriteError(EdgeKitError):
    """The checkpoint could not be written (disk full, permissions); the previous one is intact."""


class ForeignCheckpointError(UsageError):
    """A checkpoint belongs to a different model or training config (exit 2)."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["position"]["global_step"])


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:08d}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside ``path``, fsync, rename; on any failure the temp file is removed."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint file (tensors and plain values only); raises on a truncated or corrupt file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"not a checkpoint (top level is {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"not an edge-kit checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise ValueError(f"unknown checkpoint format {state['format']!r}")
    return state


def check_signature(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a checkpoint of a different model (architecture) or training setup, naming the difference."""
    differing = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if not differing:
        return
    key = differing[0]
    raise ForeignCheckpointError(
        f"checkpoint {path} belongs to a different model or training setup ({key}: "
        f"{_short(found.get(key))} in the checkpoint, {_short(expected.get(key))} now)",
        hint="use `--resume never` to start over (old checkpoints are archived, not deleted)",
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def detached_copy(value: Any) -> Any:
    """A copy that later training steps cannot change: optimizer and model tensors are updated in place."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: detached_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [detached_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(detached_copy(v) for v in value)
    return value


class CheckpointManager:
    """The checkpoints of one training run in one folder, written in the background, one at a time."""

    def __init__(self, folder: Path, keep: int, *, background: bool = True) -> None:
        self.folder = folder
        self.keep = max(1, keep)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        self._pending: Future[Path] | None = None

    def paths(self) -> list[Path]:
        """Checkpoint files, newest (highest step) first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]

    def save(self, state: dict[str, Any]) -> Path:
        """Queue a checkpoint of ``state``; returns the path it will have. Raises the previous write's error."""
        path = self.folder / checkpoint_name(int(state["position"]["global_step"]))
        snapshot = {"format": FORMAT, **detached_copy(state)}
        self.flush()
        if self._pool is None:
            return self._write(snapshot, path)
        self._pending = self._pool.submit(self._write, snapshot, path)
        return path

    def flush(self) -> None:
        """Wait for the write in flight; raise CheckpointWriteError if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, *, raise_errors: bool = True) -> None:
        try:
            if raise_errors:
                self.flush()
            elif self._pending is not None:
                with contextlib.suppress(Exception):  # an error is already on its way up
                    self._pending.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _write(self, snapshot: dict[str, Any], path: Path) -> Path:
        try:
            atomic_torch_save(snapshot, path)
        except OSError as exc:
            previous = next((p for p in self.paths() if p != path), None)
            raise CheckpointWriteError(
                f"could not write checkpoint {path.name}: {exc.strerror or exc}",
                hint=f"free some space in {self.folder}; the previous checkpoint "
                     f"{previous.name if previous else '(none)'} is intact and `--resume auto` continues from it",
            ) from exc
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)

    def latest_valid(self) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads; corrupt or truncated ones are skipped with a warning."""
        for path in self.paths():
            try:
                return LoadedCheckpoint(path, read_checkpoint(path))
            except Exception as exc:  # torch/zip raise many types for a damaged file
                log.warning("skipping unreadable checkpoint %s (%s: %s); trying the previous one",
                            path.name, type(exc).__name__, exc)
        return None

    def archive(self, reason: str) -> Path | None:
        """Move every checkpoint into a sibling folder (nothing is deleted) so a fresh run starts empty."""
        paths = self.paths()
        if not paths:
            return None
        index = 1
        while (target := self.folder.parent / f"{self.folder.name}-{reason}-{index}").exists():
            index += 1
        target.mkdir(parents=True)
        for p in paths:
            os.replace(p, target / p.name)
        return target
