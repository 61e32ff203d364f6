"""`edge-kit batch-predict` on the session's real Ray instance: verified first, resumable, every row once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import load_model
from edge_kit.ship.batch_predict import OUTPUT_SUFFIX, expand_inputs, is_complete, plan_outputs
from edge_kit.train.provenance import sha256_file
from harness.bundles import digits_like_inputs, make_bundle
from tests.helpers.ray_cluster import RayCluster


def batch_predict(cluster: RayCluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_kit", "batch-predict", *args, "--ray-address",
                           cluster.address, "--json"], env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def write_shards(folder: Path, count: int, rows: int) -> list[Path]:
    """Shards in every supported format, each with distinct seeded rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        x = digits_like_inputs(rows, seed=1000 + i)
        kind = ("npy", "npz", "csv", "parquet")[i % 4]
        path = folder / f"shard-{i:03d}.{kind}"
        if kind == "npy":
            np.save(path, x)
        elif kind == "npz":
            np.savez(path, inputs=x)
        elif kind == "csv":
            np.savetxt(path, x.reshape(rows, -1), delimiter=",", fmt="%.6g")
        else:
            flat = x.reshape(rows, -1)
            pq.write_table(pa.table({f"p{j}": flat[:, j] for j in range(flat.shape[1])}), path)
        paths.append(path)
    return paths


def expected_logits(bundle: Path, shard: Path) -> np.ndarray:
    """What `edge-agent predict`'s runtime gives for the shard, read without the batch readers."""
    runtime = load_model(bundle).runtime
    if shard.suffix == ".npy":
        x = np.load(shard)
    elif shard.suffix == ".npz":
        x = np.load(shard)["inputs"]
    elif shard.suffix == ".csv":
        x = np.loadtxt(shard, delimiter=",", dtype=np.float32)
    else:
        import pyarrow.parquet as pq

        x = np.column_stack([c.to_numpy() for c in pq.read_table(shard).columns]).astype(np.float32)
    return runtime.run(runtime.as_batch(x))


def test_outputs_are_named_after_shards_and_collisions_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.npy", tmp_path / "b" / "x.npy"
    for p in (a, b):
        p.parent.mkdir()
        np.save(p, np.zeros((1, 64), np.float32))
    shards = plan_outputs(expand_inputs(str(tmp_path / "*" / "*.npy")), tmp_path / "out")
    assert [s.output.name for s in shards] == [f"a__x.npy{OUTPUT_SUFFIX}", f"b__x.npy{OUTPUT_SUFFIX}"]
    from edge_kit.errors import UsageError

    with pytest.raises(UsageError, match=r"no \.npy"):
        expand_inputs(str(tmp_path / "nothing-*.npy"))


def test_a_partial_or_foreign_output_is_not_complete(tmp_path: Path) -> None:
    out = tmp_path / f"s.npy{OUTPUT_SUFFIX}"
    out.write_bytes(b"PK\x03\x04 truncated")
    assert not is_complete(out, "abc")
    np.savez(out, logits=np.zeros((2, 10), np.float32), rows=np.int64(2), bundle_sha256=np.str_("other"))
    assert not is_complete(out, "abc")
    np.savez(out, logits=np.zeros((2, 10), np.float32), rows=np.int64(2), bundle_sha256=np.str_("abc"))
    assert is_complete(out, "abc")


@pytest.mark.slow
@pytest.mark.integration
def test_a_tampered_bundle_is_refused_before_any_work(tmp_path: Path, ray_cluster: RayCluster) -> None:
    bundle = make_bundle(tmp_path / "b")
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.edgebundle"
    bad.write_bytes(bytes(data))
    write_shards(tmp_path / "in", 1, 8)
    result = batch_predict(ray_cluster, str(bad), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"))
    assert result.returncode == 4, result.stderr[-2000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_killed_mid_job_and_run_again_writes_every_row_exactly_once(tmp_path: Path,
                                                                    ray_cluster: RayCluster) -> None:
    bundle = make_bundle(tmp_path / "b", int8=True)
    shards = write_shards(tmp_path / "in", 24, 3000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edge_kit", "batch-predict", str(bundle), "--input", str(tmp_path / "in" / "*"),
           "--output", str(out), "--ray-address", ray_cluster.address, "--json"]
    proc = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob(f"*{OUTPUT_SUFFIX}"))) < 2:
        assert proc.poll() is None, f"ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob(f"*{OUTPUT_SUFFIX}")}
    assert 0 < len(first) < len(shards), "the kill must land mid-job"

    result = batch_predict(ray_cluster, str(bundle), "--input", str(tmp_path / "in" / "*"), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["skipped"] >= len(first) and summary["skipped"] + summary["scored"] == len(shards)
    for name, mtime in first.items():  # complete outputs were skipped, not written again
        assert (out / name).stat().st_mtime_ns == mtime

    sha = sha256_file(bundle)
    outputs = sorted(out.glob(f"*{OUTPUT_SUFFIX}"))
    assert [o.name for o in outputs] == [f"{s.name}{OUTPUT_SUFFIX}" for s in shards]
    assert not [p for p in out.iterdir() if not p.name.endswith(OUTPUT_SUFFIX)]  # no temp file left behind
    for shard, output in zip(shards, outputs, strict=True):
        with np.load(output) as npz:
            assert str(npz["bundle_sha256"]) == sha
            assert int(npz["rows"]) == 3000 == len(npz["logits"])
            np.testing.assert_array_equal(npz["logits"], expected_logits(bundle, shard))
            np.testing.assert_array_equal(npz["predictions"], npz["logits"].argmax(axis=1))

    again = batch_predict(ray_cluster, str(bundle), "--input", str(tmp_path / "in" / "*"), "--output", str(out))
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["scored"] == 0
