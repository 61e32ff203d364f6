"""Ray Train stores checkpoints no more often than `checkpoint_every` asks, plus the final one.

The loop saves at every epoch end too (the local engine's resume point); on Ray each stored checkpoint
is a report the controller takes at its next poll, so epoch ends that pass no multiple of
`checkpoint_every` are not sent, and while one report waits the next due one is sent at the loop's
following save instead (never two within one multiple). Runs `worker_loop` itself with 1 worker on the
session's Ray instance, keeping every checkpoint, and reads the steps stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edge_kit.train.checkpoint import read_checkpoint
from tests.helpers.ray_cluster import RayCluster

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

EVERY = 10
EPOCHS = 2

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import numpy as np
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from sklearn.datasets import load_digits

    from edge_kit.config import parse_config
    from edge_kit.train.data import Dataset, fit_preprocessing, split_ids
    from edge_kit.train.ray_engine import worker_loop
    from edge_kit.train.snapshot import SnapshotInfo

    address, storage, every, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    bunch = load_digits()
    X, y = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8), bunch.target.astype(np.int64)
    tr, te = split_ids(y, 0.2, 0)
    dataset = Dataset(X[tr], y[tr], X[te], y[te], tr, te, "image", (1, 8, 8), [], [str(i) for i in range(10)],
                      fit_preprocessing(X[tr], "image"), SnapshotInfo(Path("d.npz"), "n/a", Path("d.npz.dvc")))
    config = parse_config({
        "project": {"name": "cadence"},
        "model": {"factory": "edge_kit.train.models:small_cnn", "kwargs": {"channels": [4, 8], "hidden": 16}},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.01, "seed": 0, "checkpoint_every": every,
                  "threads": 1, "engine": "ray", "workers": 1},
    }, storage / "edgekit.toml")
    ray.init(address=address)
    result = TorchTrainer(
        worker_loop, train_loop_config={"config": config, "dataset": dataset, "run_id": "", "tracking_uri": None,
                                        "fingerprint": "cadence"},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="cadence", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=None))).fit()
    with result.checkpoint.as_directory() as folder:
        final = sorted(Path(folder).glob("ckpt-*.pt"))[0].name
    print(json.dumps({"final": final, "metrics": {k: v for k, v in result.metrics.items() if k != "loop_s"}}))
""")


def test_ray_stores_a_checkpoint_per_multiple_asked_and_the_final_one(tmp_path: Path,
                                                                      ray_cluster: RayCluster) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ray_cluster.address, str(tmp_path), str(EVERY),
                           str(EPOCHS)], env=ray_cluster.env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    steps_per_epoch = -(-1437 // 64)  # digits: 1437 training rows
    total = EPOCHS * steps_per_epoch
    assert doc["final"] == f"ckpt-{total:08d}.pt" and doc["metrics"]["global_step"] == total
    stored = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "cadence").glob("checkpoint_*/ckpt-*.pt"))
    assert stored[-1] == total
    multiples = [s // EVERY for s in stored]
    assert multiples == sorted(set(multiples)), f"two checkpoints within one multiple of {EVERY}: {stored}"
    assert len(stored) <= total // EVERY + 1
    # Every stored checkpoint is a complete, exact state (what a restart would resume from).
    for pt in (tmp_path / "cadence").glob("checkpoint_*/ckpt-*.pt"):
        state = read_checkpoint(pt)
        assert int(state["position"]["global_step"]) == int(pt.stem.split("-")[1])
        assert all(torch.isfinite(t).all() for t in state["model"].values())
