"""`edge-kit batch-predict` on crafted shards: the declared shape is refused before the actor allocates it.

A small .npz declaring one 400 MB row, and a 128-byte .npy declaring shape (1, 2**40) (MemoryError,
exit 1, before), are exit 2 naming the shard and what the model takes; Parquet's column count is
checked before a row group is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bundles import make_bundle
from tests.device_agent.test_agent_predict_hostile import _npy_header, inflating_npz
from tests.edge_kit.ship.test_batch_predict import batch_predict
from tests.helpers.ray_cluster import RayCluster

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_crafted_shards_are_exit_2_naming_the_declared_row(tmp_path: Path, ray_cluster: RayCluster) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    bundle = make_bundle(tmp_path / "b")
    crafted = {"bomb.npz": lambda p: inflating_npz(p, 100 * 1024 * 1024),
               "tiny.npy": lambda p: p.write_bytes(_npy_header((1, 2**40))),
               "wide.parquet": lambda p: pq.write_table(pa.table({f"c{i}": np.zeros(3) for i in range(65)}), p)}
    for name, make in crafted.items():
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        make(folder / name)
        result = batch_predict(ray_cluster, str(bundle), "--input", str(folder), "--output", str(tmp_path / "o"))
        assert result.returncode == 2, (name, result.stderr[-3000:])
        assert name in result.stderr and "it takes 64 values per row" in result.stderr, result.stderr[-3000:]
        assert "MemoryError" not in result.stderr
        assert not list((tmp_path / "o").glob(f"{name}*.pred.npz"))
