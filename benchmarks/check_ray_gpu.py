"""GPU check of the Ray engine (run on a machine with a GPU and `ray[train]` installed; this VM has no GPU).

`[train] engine = "ray"`, `use_gpu = true`, 1 worker, on a private local Ray instance, without MLflow or
DVC (the worker loop is `edge_kit.train.ray_engine.worker_loop`, the one `edge-kit train` runs):
1. an uninterrupted run;
2. a run whose worker process dies (os._exit, as a lost node) right after a mid-epoch checkpoint: Ray
   restarts the worker group from the newest checkpoint (FailureConfig(max_failures=1));
3. a run whose job fails at the same point with no restarts allowed, then a new TorchTrainer with the same
   name and storage (a restarted driver), which resumes from storage.
Both must end with weights bitwise equal to run 1. The results go to OUT_DIR/ray_gpu_check.json.

Usage: python benchmarks/check_ray_gpu.py OUT_DIR [--cpu]   (--cpu: the same checks without a GPU)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTHONPATH", str(REPO))  # the Ray workers import edge_kit from this checkout

import torch  # noqa: E402

from edge_kit.config import parse_config  # noqa: E402

EPOCHS = 3
FAIL_AFTER_STEP = 8  # mid epoch 1 (12 steps per epoch with batch 128)

CONFIG = {
    "project": {"name": "gpu-check"},
    "model": {"factory": "edge_kit.models:small_cnn", "kwargs": {"channels": [8, 16], "hidden": 32}},
    "train": {"epochs": EPOCHS, "batch_size": 128, "lr": 0.01, "seed": 0, "checkpoint_every": 4,
              "engine": "ray", "workers": 1, "use_gpu": True},
}


def faulty_loop(loop_config: dict[str, Any]) -> None:
    """The real worker loop; on the first attempt the process dies right after a checkpoint at FAIL_AFTER_STEP."""
    import ray.train

    from edge_kit.train.ray_engine import worker_loop

    marker = Path(loop_config["marker"])
    report = ray.train.report

    def dying_report(metrics: dict[str, Any], **kw: Any) -> None:
        report(metrics, **kw)
        if metrics["global_step"] >= FAIL_AFTER_STEP and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # no cleanup, no exception: what a lost node looks like to Ray

    ray.train.report = dying_report  # type: ignore[assignment]
    try:
        worker_loop(loop_config)
    finally:
        ray.train.report = report


def fit(loop: Any, loop_config: dict[str, Any], storage: Path, name: str, max_failures: int) -> Any:
    use_gpu = bool(loop_config["config"].train.use_gpu)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(loop, train_loop_config=loop_config,
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu),
                           run_config=RunConfig(name=name, storage_path=str(storage),
                                                failure_config=FailureConfig(max_failures=max_failures),
                                                checkpoint_config=CheckpointConfig(num_to_keep=3)))
    return trainer.fit()


def final_weights(result: Any) -> dict[str, torch.Tensor]:
    from edge_kit.train.ray_engine import read_latest

    with result.checkpoint.as_directory() as folder:
        loaded = read_latest(Path(folder))
    assert loaded.state["position"]["epoch"] == EPOCHS, loaded.state["position"]
    return dict(loaded.state["model"])


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def main(out_dir: Path, use_gpu: bool = True) -> int:
    import ray

    sys.path.insert(0, str(REPO / "benchmarks"))
    from check_cuda_resume import digits_dataset

    from edge_kit.train.ray_cluster import connect

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"cuda": torch.cuda.is_available(), "ray": ray.__version__, "torch": torch.__version__}
    if use_gpu and not torch.cuda.is_available():
        report["error"] = "no CUDA device"
        (out_dir / "ray_gpu_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report))
        return 1
    report["gpu"] = torch.cuda.get_device_name(0) if use_gpu else None
    with tempfile.TemporaryDirectory() as tmp:
        raw = {**CONFIG, "train": {**CONFIG["train"], "use_gpu": use_gpu}}
        config = parse_config(raw, Path(tmp) / "edgekit.toml")
        base = {"config": config, "dataset": digits_dataset(), "run_id": "", "tracking_uri": None,
                "fingerprint": "gpu-check", "marker": str(Path(tmp) / "died")}
        connect(None, 2)
        storage = Path(tmp) / "storage"

        started = time.perf_counter()
        Path(tmp, "never").write_text("x")  # the uninterrupted run: its marker exists, so it never dies
        reference = final_weights(fit(faulty_loop, {**base, "marker": str(Path(tmp) / "never")}, storage, "a", 0))
        report["uninterrupted_s"] = round(time.perf_counter() - started, 2)

        started = time.perf_counter()
        restarted = final_weights(fit(faulty_loop, {**base, "marker": str(Path(tmp) / "died-1")}, storage, "b", 1))
        report["worker_lost_s"] = round(time.perf_counter() - started, 2)
        report["worker_lost_bitwise_equal"] = equal(reference, restarted)
        report["worker_lost_died"] = Path(tmp, "died-1").exists()

        started = time.perf_counter()
        try:
            fit(faulty_loop, {**base, "marker": str(Path(tmp) / "died-2")}, storage, "c", 0)
            report["driver_restart_first_run_failed"] = False
        except Exception as exc:  # the job fails: no restarts allowed
            report["driver_restart_first_run_failed"] = type(exc).__name__
        resumed = final_weights(fit(faulty_loop, {**base, "marker": str(Path(tmp) / "died-2")}, storage, "c", 0))
        report["driver_restart_s"] = round(time.perf_counter() - started, 2)
        report["driver_restart_bitwise_equal"] = equal(reference, resumed)
    ok = bool(report["worker_lost_bitwise_equal"] and report["driver_restart_bitwise_equal"]
              and report["worker_lost_died"] and report["driver_restart_first_run_failed"])
    report["ok"] = ok
    (out_dir / "ray_gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(args[0]), use_gpu="--cpu" not in sys.argv))  # --cpu: a dry run of the script
