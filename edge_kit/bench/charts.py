"""PNG charts of a benchmark report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from device_agent.atomic import atomic_file

LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"
FOOTPRINT_PNG = "size_memory.png"


def write_charts(report: dict[str, Any], out_dir: Path) -> list[Path]:
    engines = report["engines"]
    if not engines:
        return []
    host = report["host"]
    subtitle = f"{host.get('cpu')} | {host.get('int8_isa')} | {host.get('cores')} cores"
    return [
        _latency(engines, subtitle, out_dir / LATENCY_PNG),
        _throughput(engines, subtitle, out_dir / THROUGHPUT_PNG),
        _footprint(engines, subtitle, out_dir / FOOTPRINT_PNG),
    ]


def _latency(engines: dict[str, Any], subtitle: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(engines)
    width = 0.25
    for i, pct in enumerate(("p50", "p95", "p99")):
        values = [_threads1(engines[n])[pct] for n in names]
        ax.bar([x + (i - 1) * width for x in range(len(names))], values, width, label=pct)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms per call (batch 1, 1 thread)")
    ax.set_title(f"Latency at batch 1\n{subtitle}", fontsize=10)
    ax.legend()
    return _save(fig, path)


def _throughput(engines: dict[str, Any], subtitle: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, e in engines.items():
        for threads in sorted({t["threads"] for t in e["throughput"]}):
            rows = sorted((t for t in e["throughput"] if t["threads"] == threads), key=lambda t: t["batch"])
            batches = [t["batch"] for t in rows]
            ax.errorbar(
                batches, [t["items_per_s"] for t in rows],
                yerr=[[t["items_per_s"] - t["items_per_s_min"] for t in rows],
                      [t["items_per_s_max"] - t["items_per_s"] for t in rows]],
                marker="o", capsize=3, label=f"{name}, {threads} thread(s)",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("items/s (median; bars: min..max)")
    ax.set_title(f"Throughput\n{subtitle}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _footprint(engines: dict[str, Any], subtitle: str, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    names = list(engines)
    left.bar(names, [engines[n]["model_bytes"] / 1e6 for n in names], color="tab:blue")
    left.set_ylabel("MB")
    left.set_title("model file size", fontsize=10)
    right.bar(names, [engines[n]["peak_rss_mb"] for n in names], color="tab:orange")
    right.set_ylabel("MB")
    right.set_title("peak resident memory (own process)", fontsize=10)
    fig.suptitle(subtitle, fontsize=9)
    return _save(fig, path)


def _threads1(engine: dict[str, Any]) -> dict[str, Any]:
    return next((e for e in engine["latency_ms"] if e["threads"] == 1), engine["latency_ms"][0])


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path, mode=0o644) as f:
        fig.savefig(f, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
