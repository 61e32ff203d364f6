"""report.md: what the build did and measured, for people (the manifest holds the same for machines).

The gate section is the answer to "accuracy dropped, which layer or tensor is to blame?": every check
with measured vs allowed, every round with the nodes and tensors it kept in float, and the fallback
trials (per layer and per quantized tensor) ranked as the gate ranked them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_kit.compile.gate import GateResult
from edge_kit.compile.qdq_analysis import QdqSummary
from edge_kit.compile.search import Decision


@dataclass
class ReportInputs:
    name: str
    version: str
    gate: GateResult
    quantization: dict[str, Any]
    calibration: dict[str, Any]
    qdq: QdqSummary | None
    provenance: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    bundle: str | None = None
    notes: list[str] = field(default_factory=list)
    search: Decision | None = None


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def render_report(r: ReportInputs) -> str:
    g = r.gate
    verdict = "PASSED" if g.passed else "FAILED"
    precision = r.search.chosen.spec.precision if r.search is not None else "int8"
    lines = [f"# {r.name} {r.version}: {precision} build report", ""]
    shipped = f", shipped '{g.shipped[0]}' {_pct(g.shipped[1])}" if g.shipped is not None else ""
    lines += [f"**Accuracy gate: {verdict}** ({g.metric}: fp32 {_pct(g.fp32)}, int8 {_pct(g.best.metric)}, "
              f"chosen round {g.best.round}{shipped}).", ""]
    if r.bundle:
        lines += [f"Bundle: `{r.bundle}`", ""]
    else:
        lines += ["No bundle was written: no int8 candidate met the budget.", ""]

    lines += ["## Gate checks (chosen candidate)", "", "| check | measured | allowed | result |", "|---|---|---|---|"]
    for check in g.best.checks:
        lines.append(f"| {check.name} | {check.measured:.4f} | {check.allowed:.4f} | "
                     f"{'pass' if check.passed else 'FAIL'} |")
    lines += ["", "## Rounds", "", f"| round | kept in float | {g.metric} | drop | result |",
              "|---|---|---|---|---|"]
    for cand in g.rounds:
        kept = ", ".join([*(f"`{n}`" for n in cand.excluded_nodes),
                          *(f"tensor `{t}`" for t in cand.float_tensors)]) or "none (plain int8)"
        lines.append(f"| {cand.round} | {kept} | {_pct(cand.metric)} | {_pct(g.fp32 - cand.metric)} | "
                     f"{'pass' if cand.passed else 'fail'} |")
    if g.ranking:
        lines += ["", "## Culprit ranking (fallback trials)", "",
                  "Each layer (with the nodes that read its output) and each quantized tensor was kept in float alone "
                  "and the model re-measured. Repairs that meet the budget alone come first, the one keeping the most "
                  "int8 work leading.",
                  "", f"| rank | kept in float | op | {g.metric} | recovered | int8 coverage |",
                  "|---|---|---|---|---|---|"]
        for i, b in enumerate(g.ranking, 1):
            unit = f"tensor `{b.tensors[0]}`" if b.label != b.node else f"`{b.node}`"
            coverage = "" if b.int8_coverage is None else f"{100 * b.int8_coverage:.1f}%"
            lines.append(f"| {i} | {unit} | {b.op_type} | {_pct(b.metric_with_node_fp32)} | "
                         f"{100 * b.recovered:+.2f} pts | {coverage} |")
        if not g.passed:
            culprits = g.culprits[:5]
            named = ", ".join(f"`{c}`" for c in culprits) if culprits else "no single layer"
            lines += ["", f"Culprits: {named}. Keeping them in fp32 was not enough within "
                      f"{len(g.rounds) - 1} fallback round(s); raise `gate.max_fallback_rounds`, try "
                      "`quantize.calibration = \"percentile\"` or `\"entropy\"`, or relax `gate.max_drop`."]

    if r.search is not None:
        lines += ["", *render_candidates(r.search, g.metric)]
    q = r.quantization
    lines += ["", "## Quantization", ""]
    for key in ("backend", "format", "target", "per_channel", "activation_type", "weight_type", "reduce_range",
                "target_why", "excluded_nodes", "float_tensors"):
        if key in q:
            lines.append(f"- {key}: {q[key]}")
    if "int8_coverage" in q:
        lines.append(f"- int8 coverage: {100 * q['int8_coverage']:.1f}% of the multiply-accumulates run in int8")
    if r.qdq is not None:
        s = r.qdq
        lines += [f"- QuantizeLinear nodes: {s.quantize_nodes}, DequantizeLinear nodes: {s.dequantize_nodes}",
                  f"- int8 initializers: {s.int8_initializers}, float initializers: {s.float_initializers}",
                  f"- layers running int8: {len(s.quantized_nodes)}"]
        if s.fp32_nodes:
            lines += ["", "Layers left in fp32:", "", "| node | op | why |", "|---|---|---|"]
            lines += [f"| `{n.name}` | {n.op_type} | {n.reason} |" for n in s.fp32_nodes]
    calib = r.calibration
    lines += ["", "## Calibration", "",
              f"- method: {calib.get('method')}, samples: {calib.get('samples')} from the training split, "
              f"seed {calib.get('seed')}",
              f"- ids sha256: `{calib.get('ids_sha256')}`"]
    if r.sizes:
        lines += ["", "## Size", ""]
        lines += [f"- {k}: {v / 1024:.1f} KiB" for k, v in r.sizes.items()]
    if r.timings:
        lines += ["", "## Timings", ""]
        lines += [f"- {k}: {v:.2f} s" for k, v in r.timings.items()]
    p = r.provenance
    if p:
        git = p.get("git", {})
        env = p.get("environment", {})
        data = p.get("data", {})
        ml = p.get("mlflow", {})
        lines += ["", "## Provenance", "",
                  f"- git commit: `{git.get('commit')}` (dirty: {git.get('dirty')})",
                  f"- lock sha256: `{env.get('lock_sha256')}`, python {env.get('python')}",
                  f"- data: `{data.get('path')}` dvc md5 `{data.get('dvc_md5')}`",
                  f"- MLflow run: `{ml.get('run_id')}` ({ml.get('tracking_uri')})"]
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def render_candidates(d: Decision, metric: str) -> list[str]:
    """Every candidate with its figures, the one shipped and why each other one was not."""
    host = "this host"
    if d.replayed:
        return ["## Candidate search", "",
                f"Replayed a recorded decision (no timing): shipped `{d.chosen.spec.name}` "
                f"({d.chosen.spec.precision}), {metric} {_pct(d.chosen.metric)}."]
    lines = ["## Candidate search", "",
             f"Timed on {host} with ONNX Runtime, interleaved: objective **{d.objective}**, batch {d.batch_size}, "
             f"{d.threads} thread(s), {d.spent_s:.1f} s of timing (budget {d.budget_s:.1f} s). "
             f"Shipped: **{d.chosen.spec.name}**.", "",
             f"| candidate | {metric} | int8 MACs | latency p50 ms | p95 ms | throughput /s | size KiB | result |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for c in d.candidates:
        verdict = "**shipped**" if c is d.chosen else (c.rejected or "")
        lines.append(f"| {c.spec.name} | {_pct(c.metric)} | {100 * c.coverage:.0f}% | {f(c.p50, '.4f')} | "
                     f"{f(c.p95, '.3f')} | {f(c.throughput, '.0f')} | {c.size / 1024:.1f} | {verdict} |")
    if (note := d.fp32_faster_note()) is not None:
        lines += ["", f"**{note[0].upper() + note[1:]}.** Set `quantize.allow_fp32 = true` to ship it."]
    return lines
