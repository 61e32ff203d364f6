"""Ray overhead, side by side with the no-Ray paths, in one run on one machine.

1. Training on digits (the example's model and settings, fewer epochs), without MLflow/DVC so only the
   engines differ: the local engine's `Trainer.run` in this process, and Ray Train (`worker_loop`, the
   loop `edge-kit train` runs with engine = "ray") with 1 and 2 workers on a private local Ray instance.
   Each runs E1 and E2 epochs; per-epoch time = (t(E2) - t(E1)) / (E2 - E1), start-up = t(E1) - E1 x that.
   Ray's local instance start (`ray.init`) is timed separately.
2. Batch prediction of N shards of digits-like rows with an int8 bundle: `edge-kit batch-predict`'s
   function with 1 and 2 actors (including actor start-up, as a user sees it) against `edge-agent
   predict`'s function (`device_agent.batch.predict_file`, one process, shard after shard).

A 2-core machine cannot show a speed-up from scale-out: 2 workers or actors share the same 2 cores with
Ray's own processes (and, here, with other users' jobs). What it shows is Ray's overhead.

Usage: python benchmarks/bench_ray.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

from benchmarks.common import print_table, write_result  # noqa: E402

DIGITS = {
    "project": {"name": "bench-ray"},
    "model": {"factory": "edge_kit.models:small_cnn", "kwargs": {}},
    "train": {"batch_size": 64, "lr": 1e-3, "seed": 0, "checkpoint_every": 50, "threads": 1},
}


def digits_config(tmp: Path, epochs: int, engine: str, workers: int) -> Any:
    from edge_kit.config import parse_config

    raw = {**DIGITS, "train": {**DIGITS["train"], "epochs": epochs, "engine": engine, "workers": workers}}
    return parse_config(raw, tmp / "edgekit.toml")


def time_local(tmp: Path, dataset: Any, epochs: int) -> float:
    import torch

    from edge_kit.train.checkpoint import CheckpointManager
    from edge_kit.train.trainer import StopFlag, Trainer, deterministic_algorithms

    config = digits_config(tmp, epochs, "local", 1)
    started = time.perf_counter()
    with deterministic_algorithms(1):
        trainer = Trainer(config, dataset, torch.device("cpu"))
        checkpoints = CheckpointManager(tmp / f"local-{epochs}", keep=3)
        trainer.run(save=lambda: checkpoints.save(trainer.state("bench", "bench")), on_epoch=lambda e, m: None,
                    stop=StopFlag(), flush=checkpoints.flush)
        checkpoints.close()
    return time.perf_counter() - started


def time_ray(tmp: Path, dataset: Any, epochs: int, workers: int) -> float:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from edge_kit.train.ray_engine import worker_loop

    config = digits_config(tmp, epochs, "ray", workers)
    loop_config = {"config": config, "dataset": dataset, "run_id": "", "tracking_uri": None, "fingerprint": "bench"}
    started = time.perf_counter()
    TorchTrainer(worker_loop, train_loop_config=loop_config, scaling_config=ScalingConfig(num_workers=workers),
                 run_config=RunConfig(name=f"ray-{workers}-{epochs}", storage_path=str(tmp / "storage"),
                                      checkpoint_config=CheckpointConfig(num_to_keep=3))).fit()
    return time.perf_counter() - started


def split(t1: float, t2: float, e1: int, e2: int) -> tuple[float, float]:
    per_epoch = (t2 - t1) / (e2 - e1)
    return per_epoch, t1 - e1 * per_epoch


def bench_training(tmp: Path, e1: int, e2: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from check_cuda_resume import digits_dataset

    dataset = digits_dataset()
    rows = []
    t1, t2 = time_local(tmp, dataset, e1), time_local(tmp, dataset, e2)
    per, start = split(t1, t2, e1, e2)
    rows.append({"engine": "local", "workers": 1, f"t({e1} ep) s": t1, f"t({e2} ep) s": t2, "per epoch s": per,
                 "start-up s": start})
    for workers in (1, 2):
        t1, t2 = time_ray(tmp, dataset, e1, workers), time_ray(tmp, dataset, e2, workers)
        per, start = split(t1, t2, e1, e2)
        rows.append({"engine": "ray", "workers": workers, f"t({e1} ep) s": t1, f"t({e2} ep) s": t2,
                     "per epoch s": per, "start-up s": start})
    return rows


def bench_batch(tmp: Path, shards: int, rows_per_shard: int) -> list[dict[str, Any]]:
    from device_agent.agent import load_model
    from device_agent.batch import predict_file
    from edge_kit.ship.batch_predict import batch_predict
    from harness.bundles import digits_like_inputs, make_bundle

    bundle = make_bundle(tmp / "bundle", int8=True)
    folder = tmp / "shards"
    folder.mkdir()
    for i in range(shards):
        np.save(folder / f"s{i:03d}.npy", digits_like_inputs(rows_per_shard, seed=i))
    total = shards * rows_per_shard
    out = []
    started = time.perf_counter()
    runtime = load_model(bundle).runtime
    for i in range(shards):
        predict_file(runtime, folder / f"s{i:03d}.npy", tmp / f"agent-{i}.npy")
    seconds = time.perf_counter() - started
    out.append({"path": "edge-agent predict (no Ray, 1 process)", "rows": total, "seconds": seconds,
                "rows/s": total / seconds})
    for actors in (1, 2):
        started = time.perf_counter()
        result = batch_predict(bundle, str(folder), tmp / f"ray-{actors}", actors=actors)
        seconds = time.perf_counter() - started
        assert result["rows"] == total, result
        out.append({"path": f"edge-kit batch-predict, {actors} actor(s)", "rows": total, "seconds": seconds,
                    "rows/s": total / seconds})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and rows")
    args = parser.parse_args()
    e1, e2 = (1, 2) if args.quick else (1, 4)
    shards, rows_per_shard = (4, 5000) if args.quick else (8, 20000)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp_name:
        tmp = Path(tmp_name)
        import ray

        from edge_kit.train.ray_cluster import connect

        started = time.perf_counter()
        connect(None, 2)
        ray_start = time.perf_counter() - started
        try:
            training = bench_training(tmp, e1, e2)
            batch = bench_batch(tmp, shards, rows_per_shard)
        finally:
            ray.shutdown()
    print(f"ray.init (private local instance, 2 CPUs): {ray_start:.2f} s")
    print_table(training)
    print()
    print_table(batch)
    figures = {"ray_init_s": ray_start, "training": training, "batch_predict": batch,
               "load_average_before": load_before, "load_average_after": os.getloadavg()}
    path = write_result("ray", figures, quick=args.quick, epochs=[e1, e2], shards=shards,
                        rows_per_shard=rows_per_shard,
                        note="2 cores: no scale-out speed-up is possible; the figures show Ray's overhead")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
