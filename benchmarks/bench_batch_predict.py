"""`edge-kit batch-predict` on Ray against `edge-agent predict`, side by side in one run on one machine.

Rows like scikit-learn's wine (13 features, 3 classes) through a small fp32 MLP bundle (13-32-16-3,
seeded weights, the pipeline's manifest), split into equal `.npy` shards. Per round, alternating:

- `edge-agent predict`'s function (`device_agent.batch.predict_file`), one process, shard after shard,
  with its ONNX Runtime session loaded once: the engine underneath, in rows/s;
- `edge-kit batch-predict`'s function with 1 actor on a private local Ray instance, from nothing (Ray's
  start included, as a user sees it), into a fresh output folder. Its result splits the wall time into
  `startup_s` (Ray, the actor pool, the bundle loaded in each actor) and `scoring_s`, and gives
  `rows_per_s_steady`: rows per second of one actor once warm (its first call excluded).

The aim (issue 22): steady rows/s per actor >= 80% of `edge-agent predict`'s rows/s. Figures are medians
over the rounds; the 2-core host is shared, so only the side-by-side ratio is meaningful.

Usage: python benchmarks/bench_batch_predict.py [--quick] [--rows N] [--shards N] [--rounds N]
(default 1,000,000 rows in 200 shards, 3 rounds; --quick: 200,000 rows in 40 shards, 2 rounds)
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
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

import numpy as np  # noqa: E402

from benchmarks.common import print_table, write_result  # noqa: E402

FEATURES = 13
LABELS = ["class_0", "class_1", "class_2"]
MEAN, STD = 10.0, 5.0


def wine_like_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 5.0, size=(n, FEATURES)).astype(np.float32)


def wine_bundle(out_dir: Path) -> Path:
    """A signed-format (unsigned) bundle of a 13-32-16-3 MLP, as `edge-kit build` lays one out."""
    import io

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from device_agent.bundle.format import REFERENCE, REPORT, SELFTEST, canonical_json, write_bundle
    from device_agent.monitoring.channels import MonitorPlan
    from device_agent.monitoring.reference import build_reference

    rng = np.random.default_rng(0)
    sizes = [FEATURES, 32, 16, len(LABELS)]
    nodes, inits, prev = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        inits += [numpy_helper.from_array((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(scale=0.1, size=b).astype(np.float32), f"b{i}")]
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out if out == "logits" else f"g{i}"]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "wine_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_bytes = model.SerializeToString()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    train = wine_like_rows(512, seed=100)
    logits = np.asarray(session.run(None, {"input": (train - MEAN) / STD})[0])
    names = [f"f{i}" for i in range(FEATURES)]
    plan = MonitorPlan.for_features(names, LABELS)
    reference = build_reference(plan, plan.values(train, logits), 32)
    buf = io.BytesIO()
    np.savez(buf, inputs=train[:8], outputs=logits[:8])
    manifest: dict[str, Any] = {
        "name": "wine", "version": "1.0.0", "created_at": "2026-01-01T00:00:00Z",
        "model": {"precision": "fp32",
                  "inputs": [{"name": "input", "shape": ["batch", FEATURES], "dtype": "float32"}],
                  "outputs": [{"name": "logits", "shape": ["batch", len(LABELS)], "dtype": "float32"}],
                  "output_kind": "logits", "preprocessing": {"mean": MEAN, "std": STD}},
        "labels": LABELS,
        "monitoring": plan.to_manifest(),
    }
    members = {"model.onnx": model_bytes, REFERENCE: canonical_json(reference.to_json()), SELFTEST: buf.getvalue(),
               REPORT: b"# benchmark bundle\n"}
    return write_bundle(out_dir, manifest, members)


def write_shards(folder: Path, rows: int, shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    per = rows // shards
    paths = []
    for i in range(shards):
        path = folder / f"part-{i:04d}.npy"
        np.save(path, wine_like_rows(per, seed=i))
        paths.append(path)
    return paths


def run_agent(bundle: Path, shards: list[Path], out: Path) -> dict[str, Any]:
    from device_agent.agent import load_model
    from device_agent.batch import predict_file
    from edge_kit.ship.batch_predict import READ_BATCH  # the same batch size on both sides

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runtime = load_model(bundle).runtime
    loaded = time.perf_counter()
    rows = 0
    for shard in shards:
        rows += int(predict_file(runtime, shard, out / f"{shard.stem}.out.npy", batch_size=READ_BATCH)["rows"])
    done = time.perf_counter()
    return {"rows": rows, "seconds": done - started, "load_s": loaded - started,
            "rows_per_s": rows / (done - loaded)}


def run_edge_kit(bundle: Path, inputs: Path, out: Path) -> dict[str, Any]:
    from edge_kit.ship.batch_predict import batch_predict

    started = time.perf_counter()
    result = batch_predict(bundle, str(inputs), out, actors=1)
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 rows in 40 shards, 2 rounds")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--shards", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.quick else 1_000_000)
    shards = args.shards or (40 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 3)
    load_before = os.getloadavg()
    agent_runs: list[dict[str, Any]] = []
    kit_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-bp-") as tmp_name:
        tmp = Path(tmp_name)
        bundle = wine_bundle(tmp / "bundle")
        paths = write_shards(tmp / "in", rows, shards)
        for r in range(rounds):  # alternating, fresh outputs each time
            agent_runs.append(run_agent(bundle, paths, tmp / f"agent-{r}"))
            kit_runs.append(run_edge_kit(bundle, tmp / "in", tmp / f"kit-{r}"))
            shutil.rmtree(tmp / f"agent-{r}")
            shutil.rmtree(tmp / f"kit-{r}")
            print(f"round {r + 1}/{rounds}: agent {agent_runs[-1]['rows_per_s']:,.0f} rows/s; edge-kit "
                  f"{kit_runs[-1]['wall_s']:.2f} s wall, start-up {kit_runs[-1].get('startup_s')} s, steady "
                  f"{kit_runs[-1].get('rows_per_s_steady')} rows/s", flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    agent_rate = med(agent_runs, "rows_per_s")
    steady = med(kit_runs, "rows_per_s_steady")
    table = [
        {"path": "edge-agent predict (1 process, session loaded once)", "rows": rows,
         "wall s": med(agent_runs, "seconds"), "start-up s": med(agent_runs, "load_s"), "scoring s": None,
         "rows/s (steady)": agent_rate},
        {"path": "edge-kit batch-predict, 1 actor (Ray start included)", "rows": rows,
         "wall s": med(kit_runs, "wall_s"), "start-up s": med(kit_runs, "startup_s"),
         "scoring s": med(kit_runs, "scoring_s"), "rows/s (steady)": steady},
    ]
    print_table(table)
    ratio = steady / agent_rate if steady and agent_rate else None
    per_round = [k["rows_per_s_steady"] / a["rows_per_s"] for a, k in zip(agent_runs, kit_runs, strict=True)
                 if k.get("rows_per_s_steady")]
    print(f"steady rows/s per actor / edge-agent predict rows/s: {ratio:.2f} of the medians, rounds "
          f"{', '.join(f'{r:.2f}' for r in per_round)} (aim >= 0.80); Ray's own start "
          f"{med(kit_runs, 'ray_start_s')} s of the start-up" if ratio else
          "steady rows/s not reported by this edge-kit")
    figures = {"table": table, "ratio_steady_vs_agent": ratio, "ratio_per_round": per_round,
               "agent_runs": agent_runs, "edge_kit_runs": kit_runs,
               "load_average_before": load_before, "load_average_after": os.getloadavg()}
    path = write_result("batch_predict", figures, rows=rows, shards=shards, rounds=rounds,
                        note="wine-like rows (13 features) through a 13-32-16-3 fp32 MLP; 1 actor; medians")
    from device_agent.host import host_info

    info = host_info()
    print(f"machine: {info.get('cpu')}, {info.get('cores')} cores, int8 ISA {info.get('int8_isa')}; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
