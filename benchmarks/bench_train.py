"""Training pipeline benchmark: digits example up to the checked fp32 ONNX, and what checkpointing costs.

1. Wall time of `edge-kit train --config examples/digits/edgekit.toml --json` as a user runs it (a fresh
   process), in a throwaway git+DVC copy of the example:
   - cold: first run in the project (materialise + `dvc add` the snapshot, create the MLflow store);
   - warm: a second run in the same project (`--resume never`; snapshot and store exist).
2. Checkpoint cost at the example's interval (`checkpoint_every` = 50 steps plus every epoch end):
   the same training loop, in this process, once writing real checkpoints (temp + fsync + rename) and
   once with saving switched off, alternated; share = time inside `save` / training time with saves.

Usage: python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table, write_result  # noqa: E402

EXAMPLE = REPO / "examples" / "digits"


def make_copy(dest: Path) -> Path:
    """The digits example's tracked files in a new git + DVC repository (what a clone gives a user)."""
    dest.mkdir(parents=True)
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.com"],
                 ["git", "config", "user.name", "bench"]):
        subprocess.run(args, cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True, env=_env())
    shutil.copy(EXAMPLE / "edgekit.toml", dest / "edgekit.toml")
    shutil.copy(EXAMPLE / ".gitignore", dest / ".gitignore")
    (dest / "data").mkdir()
    for record in (EXAMPLE / "data").glob("*.dvc"):
        shutil.copy(record, dest / "data" / record.name)
    return dest / "edgekit.toml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_cli(config: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edge_kit", "train", "--config", str(config), "--json", "-q",
                           *extra], capture_output=True, text=True, env=_env(), check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"edge-kit train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def pipeline_wall_times(workdir: Path, warm_runs: int) -> dict[str, Any]:
    config = make_copy(workdir / "digits")
    cold, result = run_cli(config)
    warm = [run_cli(config, "--resume", "never")[0] for _ in range(warm_runs)]
    return {"cold_s": cold, "warm_s_median": statistics.median(warm), "warm_s_min": min(warm),
            "warm_runs": warm_runs, "test_accuracy": result["metrics"]["test_accuracy"],
            "onnx_max_abs_diff": result["metrics"]["onnx_max_abs_diff"]}


def checkpoint_share(workdir: Path, repeats: int) -> dict[str, Any]:
    import torch

    from edge_kit.config import load_config
    from edge_kit.train.checkpoint import CheckpointManager
    from edge_kit.train.data import load_dataset
    from edge_kit.train.trainer import StopFlag, Trainer, deterministic_algorithms

    config = load_config(make_copy(workdir / "ckpt"))
    dataset = load_dataset(config)
    with_saves: list[float] = []
    without: list[float] = []
    save_time: list[float] = []
    saves_per_run = 0
    sizes: list[int] = []
    with deterministic_algorithms(config.train.threads):
        for i in range(repeats):
            for saving in (True, False) if i % 2 == 0 else (False, True):
                trainer = Trainer(config, dataset, torch.device("cpu"))
                manager = CheckpointManager(workdir / f"ckpts-{i}-{saving}", config.train.keep_checkpoints)
                spent = [0.0, 0]

                def save(trainer: Trainer = trainer, manager: CheckpointManager = manager,
                         spent: list[Any] = spent) -> Path:
                    t0 = time.perf_counter()
                    path = manager.save(trainer.state("bench", "bench"))
                    spent[0] += time.perf_counter() - t0
                    spent[1] += 1
                    return path

                def no_save() -> Path:
                    return Path()

                started = time.perf_counter()
                trainer.run(save=save if saving else no_save, on_epoch=lambda e, m: None, stop=StopFlag())
                elapsed = time.perf_counter() - started
                if saving:
                    with_saves.append(elapsed)
                    save_time.append(spent[0])
                    saves_per_run = int(spent[1])
                    sizes = [p.stat().st_size for p in manager.paths()]
                else:
                    without.append(elapsed)
    shares = [s / t for s, t in zip(save_time, with_saves, strict=True)]
    return {
        "checkpoint_every": config.train.checkpoint_every,
        "saves_per_run": saves_per_run,
        "checkpoint_bytes": max(sizes) if sizes else 0,
        "train_s_with_checkpoints_median": statistics.median(with_saves),
        "train_s_without_checkpoints_median": statistics.median(without),
        "save_s_per_checkpoint_median": statistics.median(save_time) / max(1, saves_per_run),
        "checkpoint_share_median": statistics.median(shares),
        "checkpoint_share_max": max(shares),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one warm run and two checkpoint repeats")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        pipeline = pipeline_wall_times(workdir, warm_runs=1 if args.quick else 3)
        ckpt = checkpoint_share(workdir, repeats=2 if args.quick else 5)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    figures = {"pipeline": pipeline, "checkpointing": ckpt}
    print_table([
        {"figure": "digits train -> fp32 ONNX, cold (s)", "value": pipeline["cold_s"]},
        {"figure": "digits train -> fp32 ONNX, warm median (s)", "value": pipeline["warm_s_median"]},
        {"figure": "test accuracy", "value": pipeline["test_accuracy"]},
        {"figure": f"checkpoint share at every {ckpt['checkpoint_every']} steps + epoch ends (median)",
         "value": f"{ckpt['checkpoint_share_median']:.2%}"},
        {"figure": "checkpoint share, worst repeat", "value": f"{ckpt['checkpoint_share_max']:.2%}"},
        {"figure": "seconds per checkpoint (median)", "value": ckpt["save_s_per_checkpoint_median"]},
        {"figure": "training loop with / without checkpoints (s)",
         "value": f"{ckpt['train_s_with_checkpoints_median']:.2f} / {ckpt['train_s_without_checkpoints_median']:.2f}"},
    ])
    out = write_result("train", figures, load_average=load, quick=args.quick,
                       note="2-core shared VM; other engineers' jobs run at the same time (see load_average)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
