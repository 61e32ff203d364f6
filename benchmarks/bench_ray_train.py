"""Ray Train with 1 worker against the local engine, same config, side by side in one run on one machine.

The issue-22 case: scikit-learn's wine (142 training rows), the `mlp` model, batch 16 (9 steps an epoch),
a checkpoint every 20 steps, one CPU thread; no MLflow, so only the engines differ. Each engine trains
E1 and E2 epochs, alternating local and Ray, for `--rounds` rounds; per-epoch time is
(t(E2) - t(E1)) / (E2 - E1) and start-up is t(E1) - E1 x that (medians over the rounds). The Ray
runs use one private local Ray instance (its start, `ray.init`, is timed apart) and a fresh run name
each, as `edge-kit train` would for a new config; Ray checkpoints are counted in the run's storage.

The aim (issue 22): Ray's per-epoch time minus the local one <= 10% of the local epoch, plus a fixed
start-up; Ray checkpoints no more often than `checkpoint_every` asks (plus the final one).

Usage: python benchmarks/bench_ray_train.py [--quick] [--epochs E1,E2] [--rounds N]
(default 2,12 epochs and 3 rounds; --quick: 2,6 and 2 rounds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import print_table, write_result  # noqa: E402

WINE: dict[str, Any] = {
    "project": {"name": "bench-ray-train"},
    "data": {"source": "sklearn:wine", "test_fraction": 0.2, "seed": 0},
    "model": {"factory": "edge_kit.train.models:mlp", "kwargs": {"hidden": [32, 16], "dropout": 0.1}},
    "train": {"batch_size": 16, "lr": 3e-3, "seed": 0, "checkpoint_every": 20, "keep_checkpoints": 3,
              "threads": 1},
}


def wine_dataset() -> Any:
    import numpy as np
    from sklearn.datasets import load_wine

    from edge_kit.train.data import Dataset, fit_preprocessing, split_ids
    from edge_kit.train.snapshot import SnapshotInfo

    bunch = load_wine()
    X = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    train_ids, test_ids = split_ids(y, 0.2, 0)
    return Dataset(X[train_ids], y[train_ids], X[test_ids], y[test_ids], train_ids, test_ids, "features",
                   (X.shape[1],), [str(f) for f in bunch.feature_names], [str(t) for t in bunch.target_names],
                   fit_preprocessing(X[train_ids], "features"), SnapshotInfo(Path("wine.npz"), "n/a",
                                                                             Path("wine.npz.dvc")))


def wine_config(tmp: Path, epochs: int, engine: str) -> Any:
    from edge_kit.config import parse_config

    raw = {**WINE, "train": {**WINE["train"], "epochs": epochs, "engine": engine, "workers": 1}}
    return parse_config(raw, tmp / "edgekit.toml")


def time_local(tmp: Path, dataset: Any, epochs: int, tag: str) -> tuple[float, float]:
    """`edge-kit train`'s local loop (Trainer.run with background checkpoints), without MLflow; returns
    the seconds in all and in the training loop (Trainer.run, the last checkpoint on disk)."""
    import torch

    from edge_kit.train.checkpoint import CheckpointManager
    from edge_kit.train.trainer import StopFlag, Trainer, deterministic_algorithms

    config = wine_config(tmp, epochs, "local")
    started = time.perf_counter()
    with deterministic_algorithms(1):
        trainer = Trainer(config, dataset, torch.device("cpu"))
        checkpoints = CheckpointManager(tmp / f"local-{tag}", keep=3)
        loop_started = time.perf_counter()
        trainer.run(save=lambda: checkpoints.save(trainer.state("bench", "bench")), on_epoch=lambda e, m: None,
                    stop=StopFlag(), flush=checkpoints.flush)
        checkpoints.close()
        loop = time.perf_counter() - loop_started
    return time.perf_counter() - started, loop


def time_ray(tmp: Path, dataset: Any, epochs: int, tag: str) -> tuple[float, float | None, int]:
    """Ray Train's `worker_loop` (what `edge-kit train` runs with engine = "ray"), 1 worker; returns the
    seconds in all, the worker's seconds in the training loop up to its final checkpoint (`loop_s` of
    the final report; None from an edge-kit that does not report it), and how many checkpoints Ray
    stored (kept or not: counted from the run's checkpoint folders)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from edge_kit.train.ray_engine import worker_loop

    config = wine_config(tmp, epochs, "ray")
    loop_config = {"config": config, "dataset": dataset, "run_id": "", "tracking_uri": None, "fingerprint": "bench"}
    storage = tmp / "storage"
    started = time.perf_counter()
    result = TorchTrainer(worker_loop, train_loop_config=loop_config, scaling_config=ScalingConfig(num_workers=1),
                          run_config=RunConfig(name=f"ray-{tag}", storage_path=str(storage),
                                               checkpoint_config=CheckpointConfig(num_to_keep=None))).fit()
    seconds = time.perf_counter() - started
    assert result.checkpoint is not None
    checkpoints = len(list((storage / f"ray-{tag}").glob("checkpoint_*/ckpt-*.pt")))
    loop = result.metrics.get("loop_s") if result.metrics else None
    return seconds, None if loop is None else float(loop), checkpoints


def split(t1: float, t2: float, e1: int, e2: int) -> tuple[float, float]:
    per_epoch = (t2 - t1) / (e2 - e1)
    return per_epoch, t1 - e1 * per_epoch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 6 epochs, 2 rounds")
    parser.add_argument("--epochs", help="E1,E2 (default 2,12)")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    e1, e2 = (int(e) for e in (args.epochs or ("2,6" if args.quick else "2,12")).split(","))
    rounds = args.rounds or (2 if args.quick else 3)
    load_before = os.getloadavg()
    dataset = wine_dataset()
    steps = -(-len(dataset.X_train) // WINE["train"]["batch_size"])
    runs: dict[str, list[float]] = {k: [] for k in ("local-1", "local-2", "ray-1", "ray-2", "local-loop-1",
                                                     "local-loop-2", "ray-loop-1", "ray-loop-2")}
    ray_checkpoints: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-train-") as tmp_name:
        tmp = Path(tmp_name)
        import ray

        from edge_kit.train.ray_cluster import connect

        started = time.perf_counter()
        connect(None, 2)
        ray_start = time.perf_counter() - started
        try:
            time_local(tmp, dataset, 1, "warm-up")  # imports, first-call costs: not measured
            time_ray(tmp, dataset, 1, "warm-up")
            for r in range(rounds):  # alternating engines and lengths
                for i, epochs in enumerate((e1, e2), start=1):
                    seconds, loop = time_local(tmp, dataset, epochs, f"{r}-{epochs}")
                    runs[f"local-{i}"].append(seconds)
                    runs[f"local-loop-{i}"].append(loop)
                    seconds, ray_loop, ray_checkpoints[epochs] = time_ray(tmp, dataset, epochs, f"{r}-{epochs}")
                    runs[f"ray-{i}"].append(seconds)
                    if ray_loop is not None:
                        runs[f"ray-loop-{i}"].append(ray_loop)
                print(f"round {r + 1}/{rounds}: local {runs['local-1'][-1]:.2f} / {runs['local-2'][-1]:.2f} s, "
                      f"ray {runs['ray-1'][-1]:.2f} / {runs['ray-2'][-1]:.2f} s ({e1} / {e2} epochs)", flush=True)
        finally:
            ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    local_epoch, local_start = split(med["local-1"], med["local-2"], e1, e2)
    ray_epoch, ray_start_up = split(med["ray-1"], med["ray-2"], e1, e2)
    # Per epoch from the training loops' own times (what start-up noise cannot reach), else from the walls.
    local_loop_epoch = split(med["local-loop-1"], med["local-loop-2"], e1, e2)[0]
    ray_loop_epoch = split(med["ray-loop-1"], med["ray-loop-2"], e1, e2)[0] if "ray-loop-1" in med else None
    overhead = (ray_loop_epoch - local_loop_epoch) if ray_loop_epoch is not None else ray_epoch - local_epoch
    base = local_loop_epoch if ray_loop_epoch is not None else local_epoch
    table = [
        {"engine": "local", f"t({e1} ep) s": med["local-1"], f"t({e2} ep) s": med["local-2"],
         "per epoch s": local_epoch, "start-up s": local_start, "loop per epoch s": local_loop_epoch,
         f"checkpoints ({e2} ep)": None},
        {"engine": "ray, 1 worker", f"t({e1} ep) s": med["ray-1"], f"t({e2} ep) s": med["ray-2"],
         "per epoch s": ray_epoch, "start-up s": ray_start_up, "loop per epoch s": ray_loop_epoch,
         f"checkpoints ({e2} ep)": ray_checkpoints.get(e2)},
    ]
    print(f"ray.init (private local instance, 2 CPUs): {ray_start:.2f} s; {steps} steps an epoch, "
          f"checkpoint_every {WINE['train']['checkpoint_every']}")
    print_table(table)
    ratio = overhead / base if base > 0 else None
    print(f"Ray overhead per epoch ({'training loops' if ray_loop_epoch is not None else 'walls'}): "
          f"{overhead * 1000:.1f} ms = "
          f"{'n/a' if ratio is None else f'{ratio:.0%}'} of the local epoch (aim <= 10%); "
          f"Ray start-up {ray_start_up:.2f} s vs local {local_start:.2f} s")
    asked = e2 * steps // WINE["train"]["checkpoint_every"]
    print(f"Ray checkpoints for {e2} epochs ({e2 * steps} steps): {ray_checkpoints.get(e2)} "
          f"(asked: {asked}, plus the final one)")
    figures = {"ray_init_s": ray_start, "table": table, "overhead_per_epoch_s": overhead,
               "overhead_ratio": ratio, "steps_per_epoch": steps, "ray_checkpoints": ray_checkpoints,
               "runs": runs, "load_average_before": load_before, "load_average_after": os.getloadavg()}
    path = write_result("ray_train", figures, epochs=[e1, e2], rounds=rounds,
                        note="wine, mlp [32,16], batch 16, checkpoint_every 20, 1 thread; medians over rounds")
    from device_agent.host import host_info

    info = host_info()
    print(f"machine: {info.get('cpu')}, {info.get('cores')} cores; load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
