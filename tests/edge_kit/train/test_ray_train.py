"""`[train] engine = "ray"` on a real local Ray instance: lost workers and a lost driver change no weight.

Every run here trains the same tiny config with 2 workers through the real CLI (`--ray-address` of the
session's Ray instance). The reference run is uninterrupted; the others are hit by a SIGKILL (one
Ray Train worker mid-epoch; the driver itself) and must end with bitwise-equal weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_kit.train.checkpoint import read_checkpoint
from tests.helpers.ray_cluster import RayCluster, train_workers
from tests.helpers.training import commit_all, make_project, tiny_config

# Each Ray run starts a worker group (two Python processes importing torch): minutes on a loaded 2-core VM.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

EPOCHS = 3  # 12 steps per epoch and rank with 2 workers: room for a kill mid-epoch
RAY_TRAIN = "engine = \"ray\"\nworkers = 2\n"


def ray_config(epochs: int = EPOCHS) -> str:
    return tiny_config(epochs) + RAY_TRAIN


def project(root: Path) -> Path:
    """A project with its data snapshot committed, so a run trained in it comes from a clean commit."""
    from edge_kit.config import load_config
    from edge_kit.train.data import load_dataset

    config = make_project(root, ray_config())
    load_dataset(load_config(config))
    commit_all(root)
    return config


def start(config: Path, tracking: str, cluster: RayCluster) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_kit", "train", "--config", str(config), "--tracking-uri", tracking,
         "--ray-address", cluster.address, "--json"],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    return finish_with_stderr(proc, timeout)[0]


def finish_with_stderr(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[dict[str, Any], str]:
    """The `--json` result, which must be all of stdout: one JSON object, whatever Ray printed meanwhile."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"stdout is not exactly one JSON object ({exc}): {out[:3000]!r}") from None
    assert isinstance(doc, dict), out[:3000]
    return doc, err


def storage_steps(config: Path) -> list[int]:
    """Global steps of the checkpoints Ray has stored for the project's run."""
    steps = []
    for pt in (config.parent / ".edgekit" / "ray").glob("edgekit-*/checkpoint_*/ckpt-*.pt"):
        steps.append(int(pt.stem.split("-")[1]))
    return steps


def wait_for_step(config: Path, proc: subprocess.Popen[str], step: int) -> None:
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        if any(s >= step for s in storage_steps(config)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no Ray checkpoint at step {step}")


def weights(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    return read_checkpoint(Path(result["checkpoint"]))["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tracking: str,
              ray_cluster: RayCluster) -> tuple[Path, dict[str, Any]]:
    config = project(tmp_path_factory.mktemp("reference"))
    return config, finish(start(config, tracking, ray_cluster))


def test_a_worker_killed_mid_epoch_restarts_the_group_and_changes_no_weight(
        tmp_path: Path, tracking: str, ray_cluster: RayCluster, reference: tuple[Path, dict[str, Any]]) -> None:
    config = project(tmp_path / "p")
    proc = start(config, tracking, ray_cluster)
    wait_for_step(config, proc, 5)  # epoch 1 has 12 steps: this is mid-epoch
    workers = train_workers(ray_cluster)
    assert len(workers) == 2, f"expected 2 Ray Train workers, found {workers}"
    os.kill(workers[-1], signal.SIGKILL)
    # Ray tells the driver that a worker died ("(raylet) A worker died or was killed ..."): on stderr, while
    # stdout stays the one JSON object a script parses.
    result, err = finish_with_stderr(proc)
    assert_bitwise_equal(weights(result), weights(reference[1]))
    assert workers[-1] not in train_workers(ray_cluster)
    # What Ray forwarded from its actors went to stderr (routed there, not dropped).
    assert "Started training worker group" in err, err[-3000:]


def test_a_killed_driver_started_again_resumes_from_storage(
        tmp_path: Path, tracking: str, ray_cluster: RayCluster, reference: tuple[Path, dict[str, Any]]) -> None:
    config = project(tmp_path / "p")
    proc = start(config, tracking, ray_cluster)
    wait_for_step(config, proc, 16)  # mid epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    record = next((config.parent / ".edgekit" / "ray").glob("edgekit-*/edgekit-run.json"))
    run_id = json.loads(record.read_text())["mlflow_run_id"]
    stored = max(storage_steps(config))

    again = start(config, tracking, ray_cluster)
    result = finish(again)
    assert result["run_id"] == run_id  # the same MLflow run continued
    assert_bitwise_equal(weights(result), weights(reference[1]))
    from mlflow import MlflowClient

    history = MlflowClient(tracking).get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert stored >= 16


def test_the_mlflow_run_has_what_a_local_run_has(tmp_path: Path, tracking: str,
                                                  reference: tuple[Path, dict[str, Any]]) -> None:
    from mlflow import MlflowClient

    from edge_kit.config import load_config
    from edge_kit.train.run import train

    local_config = make_project(tmp_path / "local", tiny_config(EPOCHS))
    local = train(load_config(local_config), tracking_uri=tracking)
    client = MlflowClient(tracking)
    ray_run, local_run = client.get_run(reference[1]["run_id"]), client.get_run(local.run_id)

    assert ray_run.info.status == "FINISHED"
    assert set(ray_run.data.params) == set(local_run.data.params)
    assert ray_run.data.params["train.engine"] == "ray" and ray_run.data.params["train.workers"] == "2"
    assert set(ray_run.data.metrics) == set(local_run.data.metrics)
    for name in ("train_loss", "test_accuracy", "throughput", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(ray_run.info.run_id, name))
        assert steps == list(range(1, EPOCHS + 1)), name
    assert set(local_run.data.tags) - {"edgekit.engine"} <= set(ray_run.data.tags)
    import ray

    assert ray_run.data.tags["edgekit.engine"] == "ray"
    assert ray_run.data.tags["edgekit.workers"] == "2"
    assert ray_run.data.tags["edgekit.ray_version"] == ray.__version__
    assert ray_run.data.tags["edgekit.completed"] == "true"

    def artifacts(run_id: str) -> set[str]:
        return {f.path for folder in ("model", "meta") for f in client.list_artifacts(run_id, folder)}

    assert {Path(p).name for p in artifacts(ray_run.info.run_id)} == \
        {Path(p).name for p in artifacts(local_run.info.run_id)}
    assert reference[1]["metrics"]["onnx_max_abs_diff"] < 1e-4  # the fp32 export passed its parity check


def test_build_from_a_ray_trained_run_gives_a_bundle_that_verifies(
        tmp_path: Path, tracking: str, ray_cluster: RayCluster, reference: tuple[Path, dict[str, Any]]) -> None:
    config, trained = reference
    out = tmp_path / "dist"
    env = ray_cluster.run_env({"RAY_ADDRESS": ray_cluster.address})
    build = subprocess.run(
        [sys.executable, "-m", "edge_kit", "build", "--config", str(config), "--out", str(out), "--unsigned",
         "--tracking-uri", tracking, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    bundle = next(out.glob("*.edgebundle"))
    built = json.loads(build.stdout.strip().splitlines()[-1])
    assert built["run_id"] == trained["run_id"]  # the Ray-trained run, reused: same config, clean commit
    verify = subprocess.run([sys.executable, "-m", "device_agent", "verify", str(bundle), "--json"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-2000:]
