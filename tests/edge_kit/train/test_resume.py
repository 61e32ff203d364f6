"""Spot-instance behaviour through the real CLI: SIGKILL or SIGTERM at any step, resume, bitwise-equal weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_kit.errors import EXIT_INTERRUPTED
from edge_kit.train.checkpoint import CheckpointManager, read_checkpoint
from harness.processes import cli_env, run_cli
from tests.helpers.training import make_project, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EPOCHS = 6  # 138 optimizer steps: long enough to interrupt twice mid-run, short enough to repeat


def start_training(config: Path, tracking: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_kit", "train", "--config", str(config), "--tracking-uri", tracking, "--json"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_cli(config: Path, tracking: str) -> Any:
    return run_cli("edge_kit", "train", "--config", str(config), "--tracking-uri", tracking, "--json",
                        timeout=300)


def wait_for_checkpoint(folder: Path, proc: subprocess.Popen[str], min_step: int) -> None:
    deadline = time.monotonic() + 240
    manager = CheckpointManager(folder, keep=1)
    while time.monotonic() < deadline:
        steps = [int(p.stem.split("-")[1]) for p in manager.paths()]
        if steps and max(steps) >= min_step:
            return
        assert proc.poll() is None, f"training ended before step {min_step}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.005)
    raise TimeoutError(f"no checkpoint at step {min_step} in {folder}")


def model_state(path: str | Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(Path(path))["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tracking: str) -> dict[str, torch.Tensor]:
    config = make_project(tmp_path_factory.mktemp("reference"), tiny_config(EPOCHS))
    result = train_cli(config, tracking)
    assert result.returncode == 0, result.stderr
    out = result.json()
    assert set(out) >= {"run_id", "checkpoint", "onnx"}
    return model_state(out["checkpoint"])


def stop_with(proc: subprocess.Popen[str], signum: int) -> tuple[str, str]:
    try:
        proc.send_signal(signum)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_then_sigkill_then_resume_is_bitwise_equal(tmp_path: Path, tracking: str,
                                                           reference: dict[str, torch.Tensor]) -> None:
    """One project goes through everything a spot instance meets, then must end where an uninterrupted run did."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    config = make_project(tmp_path, tiny_config(EPOCHS))
    folder = tmp_path / ".edgekit" / "checkpoints"

    # 1. SIGTERM (preemption notice): checkpoint, exit 75, one JSON error object, MLflow run KILLED.
    proc = start_training(config, tracking)
    wait_for_checkpoint(folder, proc, min_step=12)
    stdout, stderr = stop_with(proc, signal.SIGTERM)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert json.loads(stdout) == {"ok": False, "error": last_line.removeprefix("edge-kit: error: "),
                                  "exit_code": EXIT_INTERRUPTED}
    assert "training stopped by signal 15" in stderr and "checkpoint saved to" in stderr
    assert "Traceback" not in stderr
    newest = CheckpointManager(folder, keep=3).latest_valid()
    assert newest is not None and newest.path.name in stderr  # the checkpoint it names is the newest
    run_id = newest.state["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    # 2. Resumed, then SIGKILL (no notice, no handler, no final write): the process just vanishes.
    proc = start_training(config, tracking)
    wait_for_checkpoint(folder, proc, min_step=newest.step + 20)
    _, stderr = stop_with(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert f"resuming from {newest.path.name}" in stderr
    assert not list((tmp_path / ".edgekit").glob("runs/*/final.pt"))  # it really died before the end

    # 3. Resume from a checkpoint in the middle of an epoch, as if the kill came right after it was written,
    #    with a corrupt newer one in the way (say, the disk died mid-write): it is skipped with a warning.
    paths = CheckpointManager(folder, keep=3).paths()
    mid = next(p for p in paths if read_checkpoint(p)["position"]["batch"] != 0)
    for newer in paths[: paths.index(mid)]:
        newer.unlink()
    position = read_checkpoint(mid)["position"]
    assert 0 < position["batch"] < 23 and position["epoch"] < EPOCHS
    (folder / "ckpt-99999999.pt").write_bytes(b"PK\x03\x04truncated")
    result = train_cli(config, tracking)
    assert result.returncode == 0, result.stderr
    assert "skipping unreadable checkpoint ckpt-99999999.pt" in result.stderr
    assert f"resuming from {mid.name}" in result.stderr
    assert result.json()["run_id"] == run_id  # the same MLflow run carried on through both interruptions
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_bitwise_equal(model_state(result.json()["checkpoint"]), reference)
