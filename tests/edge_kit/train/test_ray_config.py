"""The Ray engine's pieces that need no cluster: rank sharding of the epoch order, the [train] keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_kit.config import parse_config
from edge_kit.errors import ConfigError
from edge_kit.train.ray_engine import run_name, storage_uri
from edge_kit.train.trainer import epoch_order, shard_order


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 8), epoch=st.integers(0, 5))
def test_ranks_take_equal_shares_that_give_back_the_epoch_order(n: int, world: int,
                                                                                epoch: int) -> None:
    order = epoch_order(0, epoch, n)
    shards = [shard_order(order, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal steps on every rank: DDP's collectives line up
    together = torch.cat(shards)
    assert len(together) == -(-n // world) * world
    assert set(together.tolist()) == set(range(n))
    # Read across the ranks, the shares give back the epoch's order, then the padding.
    assert torch.equal(torch.stack(shards, dim=1).flatten()[:n], order)


def test_one_worker_sees_the_local_engines_order() -> None:
    order = epoch_order(3, 2, 97)
    assert torch.equal(shard_order(order, 0, 1), order)


def test_ray_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "edgekit.toml"
    config = parse_config({"train": {"engine": "ray", "workers": 2, "use_gpu": False}}, path)
    assert (config.train.engine, config.train.workers) == ("ray", 2)
    assert storage_uri(config) == str(tmp_path / ".edgekit" / "ray")
    assert storage_uri(parse_config({"train": {"engine": "ray", "storage": "s3://b/p"}}, path)) == "s3://b/p"
    assert run_name("ab" * 32) == "edgekit-" + "ab" * 8
    with pytest.raises(ConfigError, match=r"train\.engine"):
        parse_config({"train": {"engine": "spark"}}, path)
    with pytest.raises(ConfigError, match=r"train\.workers"):
        parse_config({"train": {"workers": 2}}, path)  # local engine: one process
    with pytest.raises(ConfigError, match=r"train\.use_gpu"):
        parse_config({"train": {"use_gpu": True}}, path)
    with pytest.raises(ConfigError, match=r"train\.workers"):
        parse_config({"train": {"engine": "ray", "workers": 0}}, path)
