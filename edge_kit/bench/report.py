"""The benchmark report: one JSON document (the figures) and a Markdown page written from it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_agent.atomic import atomic_write_bytes
from edge_kit.bench.plan import ENGINE_ORDER, BenchPlan
from edge_kit.bench.verdict import int8_verdict

SCHEMA = "edgekit.bench/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

_ENGINE_TITLES = {
    "int8": "int8 ONNX (bundle), ONNX Runtime",
    "fp32": "fp32 ONNX, ONNX Runtime",
    "pytorch": "PyTorch eager (checkpoint)",
}


def build_report(plan: BenchPlan, figures: dict[str, dict[str, Any]], missing: dict[str, str],
                 host: dict[str, Any]) -> dict[str, Any]:
    manifest = plan.manifest
    engines = {name: figures[name] for name in ENGINE_ORDER if name in figures}
    engines.update({k: v for k, v in figures.items() if k not in engines})
    return {
        "schema": SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": {
            "path": str(plan.bundle),
            "name": manifest.get("name"),
            "version": manifest.get("version"),
            "model_sha256": (manifest.get("model") or {}).get("sha256"),
            "quantization": manifest.get("quantization"),
            "gate": manifest.get("gate"),
            "mlflow_run_id": ((manifest.get("provenance") or {}).get("mlflow") or {}).get("run_id"),
        },
        "host": host,
        "settings": plan.settings.to_json(),
        "data": {"source": plan.data.source, "n": len(plan.data.x), "labelled": plan.data.y is not None},
        "notes": list(plan.notes),
        "engines": engines,
        "missing": dict(missing),
        "comparison": compare(engines),
        "flags": [f.to_json() for f in int8_verdict(engines, host, manifest)],
        "mlflow": {"logged": False, "reason": "not attempted"},
        "files": {"report_json": REPORT_JSON, "report_md": REPORT_MD, "charts": []},
    }


def compare(engines: dict[str, dict[str, Any]], base: str = "int8") -> dict[str, Any]:
    """int8 against each other engine: speed-ups (>1 means int8 is faster), size ratio, accuracy drop."""
    out: dict[str, Any] = {}
    if base not in engines:
        return out
    b = engines[base]
    for name, other in engines.items():
        if name == base:
            continue
        other_latency = {e["threads"]: e["p50"] for e in other["latency_ms"]}
        other_tput = {(e["batch"], e["threads"]): e["items_per_s"] for e in other["throughput"]}
        acc_drop = None
        if b.get("accuracy") is not None and other.get("accuracy") is not None:
            acc_drop = float(other["accuracy"]) - float(b["accuracy"])
        out[f"{base}_vs_{name}"] = {
            "latency_p50_speedup": {
                str(e["threads"]): other_latency[e["threads"]] / e["p50"]
                for e in b["latency_ms"] if e["threads"] in other_latency
            },
            "throughput_speedup": {
                f"batch={e['batch']},threads={e['threads']}": e["items_per_s"] / other_tput[(e["batch"], e["threads"])]
                for e in b["throughput"] if (e["batch"], e["threads"]) in other_tput
            },
            "size_ratio": other["model_bytes"] / b["model_bytes"],
            "accuracy_drop": acc_drop,
        }
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    atomic_write_bytes(out_dir / REPORT_JSON, (json.dumps(report, indent=2, default=str) + "\n").encode(), mode=0o644)
    atomic_write_bytes(out_dir / REPORT_MD, render_markdown(report).encode(), mode=0o644)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n < 1e8 else f"{n / 1e6:.0f} MB"


def _acc(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render_markdown(report: dict[str, Any]) -> str:
    b, host, s, engines = report["bundle"], report["host"], report["settings"], report["engines"]
    lines = [f"# Benchmark: {b['name']} {b['version']}", ""]
    for flag in report["flags"]:
        if flag["level"] == "warning":
            lines += [f"> **WARNING: {flag['message']}**", ">", "> Likely reasons, most likely first:"]
            lines += [f"> - {r}" for r in flag["reasons"]]
            lines.append("")
    lines += [
        f"Bundle `{b['path']}`, model sha256 `{(b['model_sha256'] or '')[:16]}`, "
        f"measured {report['created_at']}.",
        "",
        "## Host",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {host.get('cpu')} ({host.get('machine')}), {host.get('cores')} logical cores |",
        f"| int8 ISA | {host.get('int8_isa')} (flags: {', '.join(host.get('isa_flags', [])) or 'none'}) |",
        f"| Python | {host.get('python')} on {host.get('platform')} |",
        "| Libraries | " + ", ".join(f"{k} {v}" for k, v in sorted(host.get("packages", {}).items())) + " |",
        "",
        "Figures from different hosts must not be compared; on a shared or virtual machine, other work on the",
        "host adds noise, which the min/median/max spread below shows.",
        "",
        "## Summary",
        "",
        "| engine | model file | peak RSS | load | p50 / p95 / p99 latency (batch 1, 1 thread) "
        "| best throughput | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in engines.items():
        lat = _latency_at(e, 1)
        best = max(e["throughput"], key=lambda t: t["items_per_s"])
        lines.append(
            f"| {_ENGINE_TITLES.get(name, name)} | {_mb(e['model_bytes'])} | {e['peak_rss_mb']:.0f} MB | "
            f"{e['load_seconds'] * 1000:.0f} ms | "
            f"{lat['p50']:.3f} / {lat['p95']:.3f} / {lat['p99']:.3f} ms | "
            f"{best['items_per_s']:,.0f}/s (batch {best['batch']}, {best['threads']} thr) | {_acc(e['accuracy'])} |"
        )
    for name, reason in report["missing"].items():
        lines.append(f"| {_ENGINE_TITLES.get(name, name)} | not measured: {reason} | | | | | |")
    lines += ["", f"Accuracy on {report['data']['n']} held-out samples ({report['data']['source']})."
              if report["data"]["labelled"] else
              f"No labels: accuracy not measured; inputs: {report['data']['source']}.", ""]

    if report["comparison"]:
        lines += ["## int8 against the others", "",
                  "Speed-up > 1 means int8 is faster; size ratio = other size / int8 size.", "",
                  "| against | latency p50 speed-up (by threads) | throughput speed-up (batch, threads) | size ratio "
                  "| accuracy drop |", "|---|---|---|---|---|"]
        for key, c in report["comparison"].items():
            lat_text = ", ".join(f"{t} thr: {v:.2f}x" for t, v in c["latency_p50_speedup"].items())
            tput = ", ".join(f"{k.replace('batch=', 'b').replace(',threads=', '/')}: {v:.2f}x"
                             for k, v in c["throughput_speedup"].items())
            drop = "n/a" if c["accuracy_drop"] is None else f"{c['accuracy_drop']:+.4f}"
            lines.append(f"| {key.split('_vs_')[1]} | {lat_text} | {tput} | {c['size_ratio']:.2f} | {drop} |")
        lines.append("")

    lines += ["## Latency, batch 1 (ms)", "",
              "| engine | threads | p50 | p95 | p99 | min | median | max | calls |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, e in engines.items():
        for row in e["latency_ms"]:
            lines.append(f"| {name} | {row['threads']} | {row['p50']:.3f} | {row['p95']:.3f} | {row['p99']:.3f} | "
                         f"{row['min']:.3f} | {row['median']:.3f} | {row['max']:.3f} | {row['n']} |")
    lines += ["", "## Throughput (items/s; median, with the range from the slowest to the fastest call)", "",
              "| engine | batch | threads | items/s | min..max items/s | calls |", "|---|---|---|---|---|---|"]
    for name, e in engines.items():
        for t in e["throughput"]:
            lines.append(f"| {name} | {t['batch']} | {t['threads']} | {t['items_per_s']:,.0f} | "
                         f"{t['items_per_s_min']:,.0f}..{t['items_per_s_max']:,.0f} | {t['seconds_per_batch']['n']} |")
    lines += ["", "## Method", "",
              "- Each engine ran in its own child process (so peak resident memory is that engine's alone, "
              f"including its runtime's import). Inputs: {report['data']['source']}.",
              f"- Warm-up: {s['warmup']} calls before each latency series; latency: {s['latency_repeats']} timed "
              f"batch-1 calls per thread count; throughput: {s['throughput_repeats']} timed calls per batch size "
              f"and thread count (batch sizes {s['batch_sizes']}, threads {s['thread_counts']}).",
              "- ONNX Runtime: CPU execution provider, all graph optimisations, sequential execution, one session "
              "per thread count. PyTorch: eager mode under `inference_mode`, `torch.set_num_threads`.",
              ""]
    lines += [f"- Note: {f['message']}" for f in report["flags"] if f["level"] != "warning"]
    lines += [f"- Note: {n}" for n in report["notes"]]
    lines.append("")
    if report["files"]["charts"]:
        lines += ["## Charts", ""] + [f"![{c}]({c})" for c in report["files"]["charts"]] + [""]
    m = report["mlflow"]
    lines += ["## MLflow", "",
              f"Logged to run `{m.get('run_id')}` at `{m.get('tracking_uri')}` under `{m.get('artifact_path')}`."
              if m.get("logged") else f"Not logged to MLflow: {m.get('reason')}.", ""]
    return "\n".join(lines)


def _latency_at(engine: dict[str, Any], threads: int) -> dict[str, Any]:
    entries = engine["latency_ms"]
    return next((e for e in entries if e["threads"] == threads), entries[0])
