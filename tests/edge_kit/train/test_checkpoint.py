"""Checkpoint files: atomic, pruned, corrupt ones skipped, foreign ones refused, a full disk loses nothing."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_kit.train import checkpoint as ckpt
from edge_kit.train.checkpoint import (
    CheckpointManager,
    CheckpointWriteError,
    ForeignCheckpointError,
    check_signature,
    read_checkpoint,
)


def state(step: int) -> dict[str, Any]:
    return {
        "signature": {"factory": "m:f", "architecture": [["w", [2]]]},
        "model": {"w": torch.full((2,), float(step))},
        "optimizer": {}, "scheduler": {}, "rng": {"torch": torch.get_rng_state()},
        "position": {"epoch": 0, "batch": step, "global_step": step, "loss_sum": 0.0, "seen": 0},
    }


def test_keeps_the_newest_few(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (4, 8, 12):
        manager.save(state(step))
    manager.close()
    assert [p.name for p in manager.paths()] == ["ckpt-00000012.pt", "ckpt-00000008.pt"]
    latest = manager.latest_valid()
    assert latest is not None and latest.step == 12
    assert torch.equal(latest.state["model"]["w"], torch.full((2,), 12.0))
    assert list(tmp_path.glob("*.tmp")) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_checkpoint"])
def test_corrupt_newest_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 damage: str) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(state(4))
    newest = manager.save(state(8))
    manager.flush()
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(1)}, newest)
    with caplog.at_level(logging.WARNING, logger="edge_kit.train.checkpoint"):
        latest = manager.latest_valid()
    assert latest is not None and latest.step == 4
    assert "skipping unreadable checkpoint ckpt-00000008.pt" in caplog.text


def test_no_valid_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"broken")
    assert CheckpointManager(tmp_path, keep=3).latest_valid() is None
    assert CheckpointManager(tmp_path / "missing", keep=3).latest_valid() is None


@pytest.mark.parametrize("background", [True, False])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 background: bool) -> None:
    manager = CheckpointManager(tmp_path, keep=1, background=background)
    manager.save(state(4))
    manager.flush()
    real_save = torch.save

    def disk_full(obj: Any, f: Any) -> None:
        real_save(obj, f)  # part of the bytes reach the temp file...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(state(8))
        manager.flush()  # a background write reports its failure here (or at the next save)
    message = str(info.value)
    assert "No space left on device" in message and "ckpt-00000004.pt is intact" in message
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000004.pt"]  # no temp file, no new name
    assert read_checkpoint(tmp_path / "ckpt-00000004.pt")["position"]["global_step"] == 4


def test_loading_never_runs_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    path = tmp_path / "ckpt-00000004.pt"
    torch.save({**state(4), "format": ckpt.FORMAT, "extra": Evil()}, path)
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported"):
        read_checkpoint(path)


def test_foreign_signature_is_refused_naming_the_difference(tmp_path: Path) -> None:
    found = {"factory": "edge_kit.models:mlp", "architecture": [["w", [2]]]}
    check_signature(tmp_path, found, dict(found))
    with pytest.raises(ForeignCheckpointError, match="different model") as info:
        check_signature(tmp_path, found, {**found, "factory": "edge_kit.models:small_cnn"})
    assert "factory" in str(info.value) and info.value.exit_code == 2


def test_saved_state_is_a_snapshot_not_a_live_view(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    live = state(4)
    manager.save(live)
    live["model"]["w"].add_(100.0)  # the next optimizer step changes tensors in place
    manager.close()
    assert torch.equal(read_checkpoint(tmp_path / "ckpt-00000004.pt")["model"]["w"], torch.full((2,), 4.0))


def test_archive_moves_instead_of_deleting(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", keep=3)
    manager.save(state(4))
    manager.flush()
    target = manager.archive("replaced")
    assert target is not None and (target / "ckpt-00000004.pt").is_file()
    assert manager.paths() == []
