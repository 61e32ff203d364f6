"""Spot-instance behaviour through the real CLI: SIGKILL or SIGTERM at any step, resume, bitwise-equal weights."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from training_helpers import make_project, tiny_config

from edge_kit.checkpoint import CheckpointManager, read_checkpoint
from edge_kit.errors import EXIT_INTERRUPTED

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EPOCHS = 6  # 138 optimizer steps: long enough to interrupt mid-epoch, short enough to repeat three times


def _root_conftest() -> ModuleType:
    """The suite's conftest (cli_env, run_cli): the CLI runs as `python -m edge_kit` from this checkout."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("edge_kit_tests_root_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


ROOT = _root_conftest()


def start_training(config: Path, tracking: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_kit", "train", "--config", str(config), "--tracking-uri", tracking, "--json"],
        env=ROOT.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_cli(config: Path, tracking: str) -> Any:
    return ROOT.run_cli("edge_kit", "train", "--config", str(config), "--tracking-uri", tracking, "--json",
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


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path: Path, tracking: str,
                                                         reference: dict[str, torch.Tensor]) -> None:
    config = make_project(tmp_path, tiny_config(EPOCHS))
    folder = tmp_path / ".edgekit" / "checkpoints"
    proc = start_training(config, tracking)
    try:
        wait_for_checkpoint(folder, proc, min_step=30)
        proc.send_signal(signal.SIGKILL)  # no handler, no final write: the process just vanishes
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list((tmp_path / ".edgekit").glob("runs/*/final.pt"))  # it really died before the end
    # Resume from a checkpoint in the middle of an epoch, as if the kill came right after it was written.
    manager = CheckpointManager(folder, keep=3)
    paths = manager.paths()
    mid = next(p for p in paths if read_checkpoint(p)["position"]["batch"] != 0)
    for newer in paths[: paths.index(mid)]:
        newer.unlink()
    position = read_checkpoint(mid)["position"]
    assert 0 < position["batch"] < 23 and position["epoch"] < EPOCHS
    result = train_cli(config, tracking)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {mid.name}" in result.stderr
    assert_bitwise_equal(model_state(result.json()["checkpoint"]), reference)


def test_sigterm_checkpoints_exits_75_and_resumes_bitwise_equal(tmp_path: Path, tracking: str,
                                                                reference: dict[str, torch.Tensor]) -> None:
    from mlflow import MlflowClient

    config = make_project(tmp_path, tiny_config(EPOCHS))
    folder = tmp_path / ".edgekit" / "checkpoints"
    proc = start_training(config, tracking)
    try:
        wait_for_checkpoint(folder, proc, min_step=12)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert json.loads(stdout) == {"ok": False, "error": last_line.removeprefix("edge-kit: error: "),
                                  "exit_code": EXIT_INTERRUPTED}
    assert "training stopped by signal 15" in stderr and "checkpoint saved to" in stderr
    assert "Traceback" not in stderr
    newest = CheckpointManager(folder, keep=3).latest_valid()
    assert newest is not None and newest.path.name in stderr  # the checkpoint it names is the newest
    killed = MlflowClient(tracking_uri=tracking).get_run(newest.state["mlflow_run_id"])
    assert killed.info.status == "KILLED"

    # A corrupt newer checkpoint (say, the disk died mid-write) is skipped in favour of the valid one.
    (folder / "ckpt-99999999.pt").write_bytes(b"PK\x03\x04truncated")
    result = train_cli(config, tracking)
    assert result.returncode == 0, result.stderr
    assert "skipping unreadable checkpoint ckpt-99999999.pt" in result.stderr
    assert result.json()["run_id"] == killed.info.run_id  # the same MLflow run carries on
    assert MlflowClient(tracking_uri=tracking).get_run(killed.info.run_id).info.status == "FINISHED"
    assert_bitwise_equal(model_state(result.json()["checkpoint"]), reference)
