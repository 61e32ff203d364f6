"""Shared by every benchmark script: host description and the result file convention.

Each `benchmarks/bench_*.py` is runnable on its own (`python benchmarks/bench_x.py [--quick]`),
prints a table, and writes `benchmarks/results/<name>.json` = {"name", "machine", "figures", ...}
through `write_result`; `make bench` runs them all and gathers the README table.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_agent.host import host_info
from edge_kit.bench.measure import time_calls

# EDGEKIT_BENCH_RESULTS redirects every script's results (run_all.py's --results sets it).
RESULTS = Path(os.environ.get("EDGEKIT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def write_result(name: str, figures: dict[str, Any], **extra: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {
        "name": name,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host_info(),
        "figures": figures,
        **extra,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out


def time_repeated(fn: Callable[[], Any], *, repeat: int, warmup: int = 3) -> dict[str, float]:
    """min/median/max seconds of `fn` over `repeat` calls after `warmup` calls."""
    samples = time_calls(fn, repeat=repeat, warmup=warmup)
    return {"min": min(samples), "median": statistics.median(samples), "max": max(samples), "n": len(samples)}


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
