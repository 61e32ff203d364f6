"""What counting exact repeats of inputs costs the agent's hot path, side by side in one run.

    python benchmarks/bench_repeats.py [--quick]

One chunk of the window monitor (`WindowSummary.update_by_channel` on the channel values, as the
background worker runs it) with and without `count_inputs` on the chunk's raw rows, for digits-shaped
inputs (1x8x8 float32) and a camera-shaped one (3x224x224), interleaved in rounds so that load from
other processes hits both alike; per-row microseconds and the ratio. Results: results/repeats.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import print_table, write_result
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import build_reference
from device_agent.monitoring.summary import Histogrammer, WindowSummary

MODEL = {"name": "bench", "version": "1", "sha256": "e" * 64}


def case(shape: tuple[int, ...], rows: int, rounds: int) -> dict[str, object]:
    plan = MonitorPlan.for_image(shape, [str(i) for i in range(10)])
    rng = np.random.default_rng(0)
    train = rng.random((200, *shape), dtype=np.float32)
    logits = rng.normal(size=(200, 10)).astype(np.float32)
    hist = Histogrammer(build_reference(plan, plan.values(train, logits), 32))
    raw = rng.random((rows, *shape), dtype=np.float32)
    out = rng.normal(size=(rows, 10)).astype(np.float32)
    columns = plan.values_by_channel(raw, out)
    times = {"summary only": 0.0, "summary + repeats": 0.0}
    for r in range(rounds):
        for name in (list(times) if r % 2 == 0 else list(reversed(times))):
            s = WindowSummary.zero(hist, fleet="f", device="d", model=MODEL, window_start=0.0)
            t0 = time.perf_counter()
            s.update_by_channel(hist, columns)
            if name == "summary + repeats":
                s.count_inputs(raw)
            times[name] += time.perf_counter() - t0
    per_row = {k: v / (rounds * rows) * 1e6 for k, v in times.items()}
    hashing_only = WindowSummary.zero(hist, fleet="f", device="d", model=MODEL, window_start=0.0)
    t0 = time.perf_counter()
    for _ in range(rounds):
        hashing_only.count_inputs(raw)
    return {"input": "x".join(map(str, shape)), "rows per chunk": rows,
            "summary us/row": round(per_row["summary only"], 3),
            "summary + repeats us/row": round(per_row["summary + repeats"], 3),
            "hashing alone us/row": round((time.perf_counter() - t0) / (rounds * rows) * 1e6, 3),
            "ratio": round(per_row["summary + repeats"] / per_row["summary only"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 4 if args.quick else 20
    rows = [case((1, 8, 8), 8192, rounds), case((3, 224, 224), 6, rounds * 10)]
    print_table(rows)
    out = write_result("repeats", {"chunks": rows}, quick=args.quick,
                       conditions="2-core shared VM, other engineers' jobs running concurrently")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
