"""Gather `results/*.json` (one per benchmark script) into `results/README.md`: the latest figures and
the machine each came from, with this run's outcome of every script, failures and missing ones included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_FIGURE_ROWS = 60


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            docs[path.stem] = {"name": path.stem, "unreadable": f"{type(exc).__name__}: {exc}"}
            continue
        if isinstance(doc, dict):
            docs[str(doc.get("name") or path.stem)] = doc
    return docs


def machine_line(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "unknown machine"
    packages = ", ".join(f"{k} {v}" for k, v in sorted((machine.get("packages") or {}).items()))
    return (f"{machine.get('cpu')} ({machine.get('machine')}), {machine.get('cores')} cores, "
            f"int8: {machine.get('int8_isa')}; Python {machine.get('python')}; {packages}")


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested figures as (dotted key, value); lists of records keyed by their position."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict | list) for v in value):
        out = []
        for i, v in enumerate(value):
            out.extend(flatten(v, f"{prefix}[{i}]"))
        return out
    return [(prefix, value)]


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "n/a"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    return str(v).replace("|", "\\|")


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(c for c in r if c not in cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def render(outcomes: dict[str, dict[str, Any]], docs: dict[str, dict[str, Any]]) -> str:
    """The README: a status table of every script (this run), then each benchmark's figures and machine."""
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`benchmarks/run_all.py`); each section is the latest result of one script, "
             "with the machine it was measured on. Figures from different machines are not comparable.", ""]
    machines = {machine_line(d.get("machine")) for d in docs.values() if d.get("machine")}
    if len(machines) > 1:
        lines += ["> **The results below come from different machines**: compare figures only within one machine.",
                  ""]
    refreshed = {r for o in outcomes.values() for r in o.get("results", [])}
    lines += ["| script | this run | results | seconds |", "|---|---|---|---|"]
    for name in sorted(outcomes):
        o = outcomes[name]
        status = o["status"] + (f": {o['detail']}" if o.get("detail") else "")
        seconds = f"{o['seconds']:.0f}" if o.get("seconds") is not None else ""
        lines.append(f"| {name} | {fmt(status)} | {', '.join(o.get('results', []))} | {seconds} |")
    lines.append("")
    for name in sorted(docs):
        d = docs[name]
        lines += [f"## {name}", ""]
        if "unreadable" in d:
            lines += [f"Result file unreadable: {d['unreadable']}", ""]
            continue
        if outcomes and name not in refreshed:
            lines += [f"> These figures are **stale** (from {d.get('measured_at')}): no script wrote them in this "
                      "run (see the table above).", ""]
        lines += [f"Measured {d.get('measured_at')} on {machine_line(d.get('machine'))}.", ""]
        if d.get("description"):
            lines += [str(d["description"]), ""]
        if isinstance(d.get("rows"), list) and d["rows"] and all(isinstance(r, dict) for r in d["rows"]):
            lines += [*rows_table(d["rows"]), ""]
        figures = flatten(d.get("figures", {}))
        if figures:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {k} | {fmt(v)} |" for k, v in figures[:MAX_FIGURE_ROWS]]
            if len(figures) > MAX_FIGURE_ROWS:
                lines.append(f"| ... | {len(figures) - MAX_FIGURE_ROWS} more in {name}.json |")
            lines.append("")
    return "\n".join(lines)
