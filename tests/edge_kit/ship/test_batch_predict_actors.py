"""batch-predict's actor side and its timing: calls of several shards, outputs on disk when a call
returns, a refused shard stops the call, a failed write is raised; the CLI reports start-up apart from
scoring and logs progress."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import load_model
from edge_kit.ship.batch_predict import (
    CALLS_PER_ACTOR,
    MAX_SHARDS_PER_CALL,
    OUTPUT_SUFFIX,
    OutputWriter,
    Shard,
    ShardScorer,
    expand_inputs,
    is_complete,
    plan_calls,
    plan_outputs,
)
from edge_kit.train.provenance import sha256_file
from harness.bundles import digits_like_inputs, make_bundle
from tests.edge_kit.ship.test_batch_predict import batch_predict
from tests.helpers.ray_cluster import RayCluster


def shards_in(folder: Path, count: int, rows: int) -> list[Shard]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        np.save(folder / f"s{i:03d}.npy", digits_like_inputs(rows, seed=i))
    return plan_outputs(expand_inputs(str(folder)), folder.parent / "out")


def test_calls_group_shards_and_keep_every_shard_once(tmp_path: Path) -> None:
    todo = shards_in(tmp_path / "in", 50, 2)
    for actors in (1, 2, 7, 60):
        calls = plan_calls(todo, actors)
        assert [s for call in calls for s in call] == todo  # every shard once, in order
        assert max(len(c) for c in calls) <= MAX_SHARDS_PER_CALL
        if len(todo) >= actors * CALLS_PER_ACTOR:
            assert len(calls) >= actors * CALLS_PER_ACTOR  # each actor gets several calls
    assert [len(c) for c in plan_calls(todo, 1)] == [50 // CALLS_PER_ACTOR] * 8 + [2]


def test_a_call_holds_about_call_bytes_of_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    todo = shards_in(tmp_path / "in", 40, 100)  # 25.7 kB a shard
    monkeypatch.setattr("edge_kit.ship.batch_predict.CALL_BYTES", 60_000)
    assert [len(c) for c in plan_calls(todo, 1)] == [2] * 20


def test_a_call_writes_every_output_before_it_returns(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", int8=True)
    sha = sha256_file(bundle)
    todo = shards_in(tmp_path / "in", 12, 700)
    scorer = ShardScorer(str(bundle), None, sha)
    results = scorer.score([(str(s.source), str(s.output)) for s in todo])
    assert [r["rows"] for r in results] == [700] * 12 and not any(r["error"] for r in results)
    runtime = load_model(bundle).runtime
    for shard in todo:
        assert is_complete(shard.output, sha)
        with np.load(shard.output) as npz:
            np.testing.assert_array_equal(npz["logits"], runtime.run(runtime.as_batch(np.load(shard.source))))
            np.testing.assert_array_equal(npz["predictions"], npz["logits"].argmax(axis=1))
            assert str(npz["model_sha256"]) == runtime.info.sha256 and str(npz["source"]) == str(shard.source)
    assert not [p for p in todo[0].output.parent.iterdir() if not p.name.endswith(OUTPUT_SUFFIX)]


def test_a_refused_shard_is_returned_and_ends_the_call(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    todo = shards_in(tmp_path / "in", 3, 5)
    np.save(todo[1].source, np.zeros((4, 7), np.float32))  # rows that do not fit the model
    results = ShardScorer(str(bundle), None, sha256_file(bundle)).score(
        [(str(s.source), str(s.output)) for s in todo])
    assert [r["exit_code"] for r in results] == [0, 2]
    assert todo[1].source.name in results[1]["error"]
    assert todo[0].output.is_file() and not todo[1].output.exists() and not todo[2].output.exists()


def test_a_failed_write_is_raised_by_drain(tmp_path: Path) -> None:
    writer = OutputWriter()
    blocked = tmp_path / "taken.pred.npz"
    (blocked / "inside").mkdir(parents=True)  # a non-empty folder where the file should go
    writer.submit(tmp_path / "fine.pred.npz", b"x")
    writer.submit(blocked, b"y")
    with pytest.raises(OSError):
        writer.drain()
    assert (tmp_path / "fine.pred.npz").read_bytes() == b"x"
    writer.drain()  # nothing left behind to raise again


@pytest.mark.slow
@pytest.mark.integration
def test_the_result_reports_start_up_apart_and_progress_is_logged(tmp_path: Path,
                                                                 ray_cluster: RayCluster) -> None:
    bundle = make_bundle(tmp_path / "b", int8=True)
    shards_in(tmp_path / "in", 16, 400)
    result = batch_predict(ray_cluster, str(bundle), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["rows"] == 16 * 400 and doc["scored"] == 16 and doc["actors"] == 1
    assert 0 < doc["ray_start_s"] <= doc["startup_s"] < doc["seconds"]
    assert doc["scoring_s"] >= 0 and doc["rows_per_s_steady"] > 0
    assert "start-up" in result.stderr and "16/16 shards, 6400 rows" in result.stderr
