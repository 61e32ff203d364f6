"""After the gate: time every candidate that passes it on this host and pick the one to ship.

ONNX Runtime quantizes what it is told and Intel Neural Compressor stops at the first config that
passes; neither asks which passing model is fastest on the machine it will run on. At ~17 us per
inference (the digits CNN) the Q/DQ overhead can make int8 slower than fp32, and whether an op
is faster in int8 depends on the host's kernels, so the answer is measured, never assumed.

Candidates: the gate's rounds (plain int8 and its fallback variants), int8 per-tensor as well as
per-channel, int8 with the fully connected layers (Gemm/MatMul, where the Q/DQ overhead outweighs
small int8 kernels) left fp32, int8 with the model's edges in float (the first compute layer alone
in fp32, whose few input channels make a slow int8 kernel, and/or the outputs' final Q/DQ pair
dropped so the last layer writes float directly: both remove nodes, which is what a tiny model's
latency is made of), and fp32 itself, which is timed always but shipped only when
`quantize.allow_fp32` is set. Every candidate is measured against the accuracy gate first; one
that fails is listed with why and never shipped. The survivors are timed with ONNX Runtime,
interleaved round by round (so a load change hits all of them alike), at the configured batch size
and threads, until the time budget is spent. The objective picks the winner; candidates within
`TIE_TOLERANCE` of the best count as tied and the smallest file wins.

The decision is recorded (`Decision.to_manifest`) so `reproduce` rebuilds the chosen candidate
without timing again: timings vary run to run, the chosen model's bytes must not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_kit.compile.coverage import model_int8_coverage
from edge_kit.compile.evaluate import session
from edge_kit.compile.gate import GateResult, MetricCheck
from edge_kit.config import GateSection, QuantizeSection
from edge_kit.errors import UsageError

if TYPE_CHECKING:
    from edge_kit.compile.quantize import Quantizer

log = logging.getLogger(__name__)

TIE_TOLERANCE = 0.03  # within 3% of the best figure counts as a tie (below the noise of a shared host)
MIN_TIMED_CALLS = 5  # per candidate, even when the budget runs out in the first round


@dataclass(frozen=True)
class Spec:
    """How to rebuild a candidate: enough to replay the decision without timing."""

    name: str
    precision: str  # "int8" or "fp32"
    per_channel: bool = True
    excluded_nodes: tuple[str, ...] = ()
    float_tensors: tuple[str, ...] = ()  # activations left unquantized (the gate's tensor repairs)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "per_channel": self.per_channel,
                "excluded_nodes": list(self.excluded_nodes), "float_tensors": list(self.float_tensors)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Spec:
        return cls(str(doc["name"]), str(doc["precision"]), bool(doc.get("per_channel", True)),
                   tuple(doc.get("excluded_nodes", ())), tuple(doc.get("float_tensors", ())))


@dataclass
class Timed:
    """One candidate's measurements; `rejected` says why it cannot ship (None: it can)."""

    spec: Spec
    path: Path
    metric: float
    checks: tuple[MetricCheck, ...]
    size: int
    latencies_ms: list[float] = field(default_factory=list)
    batch_size: int = 1
    rejected: str | None = None
    coverage: float = 0.0  # share of multiply-accumulates in int8 (edge_kit.compile.coverage)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def p50(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else None

    @property
    def p95(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

    @property
    def throughput(self) -> float | None:
        """Inferences (rows) per second at the timed batch size."""
        return 1000.0 * self.batch_size / float(np.mean(self.latencies_ms)) if self.latencies_ms else None

    def to_json(self) -> dict[str, Any]:
        def r(v: float | None, nd: int = 4) -> float | None:
            return None if v is None else round(v, nd)

        return {**self.spec.to_json(), "metric": self.metric, "passed": self.passed, "size_bytes": self.size,
                "int8_coverage": round(self.coverage, 4),
                "latency_p50_ms": r(self.p50), "latency_p95_ms": r(self.p95),
                "throughput_per_s": r(self.throughput, 1), "timed_calls": len(self.latencies_ms),
                "rejected": self.rejected}


@dataclass
class Decision:
    objective: str
    batch_size: int
    threads: int
    budget_s: float
    spent_s: float
    candidates: list[Timed]
    chosen: Timed
    allow_fp32: bool
    replayed: bool = False

    @property
    def fp32(self) -> Timed | None:
        return next((c for c in self.candidates if c.spec.precision == "fp32"), None)

    def fp32_faster_note(self) -> str | None:
        """Plain words when fp32 beat the shipped int8 model on this host at the configured settings."""
        f, c = self.fp32, self.chosen
        if f is None or c is f or f.p50 is None or c.p50 is None or self.objective == "size":
            return None
        if f.p50 < c.p50 * (1 - TIE_TOLERANCE):
            return (f"fp32 was faster on this host: {f.p50:.3f} ms vs {c.p50:.3f} ms p50 for the shipped "
                    f"'{c.spec.name}' at batch {self.batch_size}, {self.threads} thread(s); it was not shipped "
                    "because quantize.allow_fp32 is false")
        return None

    def to_manifest(self, host: dict[str, Any]) -> dict[str, Any]:
        return {"objective": self.objective, "batch_size": self.batch_size, "threads": self.threads,
                "budget_s": self.budget_s, "spent_s": round(self.spent_s, 3), "allow_fp32": self.allow_fp32,
                "replayed": self.replayed, "chosen": self.chosen.spec.to_json(),
                "chosen_figures": self.chosen.to_json(), "host": host,
                "candidates": [c.to_json() for c in self.candidates]}


def int8_specs(gate: GateResult, dense_nodes: Sequence[str], per_channel: bool) -> list[Spec]:
    """The int8 candidates: every gate round, the other weight granularity, dense layers in fp32."""
    specs: list[Spec] = []
    for cand in gate.rounds:
        name = "int8" if cand.round == 0 else f"int8 gate round {cand.round}"
        specs.append(Spec(f"{name} ({'per-channel' if per_channel else 'per-tensor'})", "int8", per_channel,
                          cand.excluded_nodes, cand.float_tensors))
    best, tensors = gate.best.excluded_nodes, gate.best.float_tensors
    specs.append(Spec(f"int8 ({'per-tensor' if per_channel else 'per-channel'})"
                      + (f", gate round {gate.best.round}" if gate.best.round else ""), "int8", not per_channel, best,
                      tensors))
    dense = tuple(sorted(set(best) | set(dense_nodes)))
    if dense_nodes and dense != best:
        specs.append(Spec("int8 convs, dense layers fp32", "int8", per_channel, dense, tensors))
    return specs


def edge_specs(gate: GateResult, first_layer: str | None, outputs: Sequence[str], per_channel: bool) -> list[Spec]:
    """int8 with the model's edges in float: the first compute layer alone fp32, the outputs' Q/DQ dropped.

    On the digits CNN (~50 us a call, AVX2 host) the 1-channel first conv is slower in int8 and the
    final Quantize/DequantizeLinear pair is pure overhead: in one side-by-side run plain int8 ran 0.94x
    fp32 at batch 1 and 0.87x at batch 16, both edges float 1.03x and 1.13x (later runs: 0.72-0.89x
    and 1.03-1.22x). Whether it holds on a host is for the timing.
    """
    best, tensors = gate.best.excluded_nodes, gate.best.float_tensors
    first = tuple(sorted({*best, first_layer})) if first_layer and first_layer not in best else None
    floats = tuple(sorted({*tensors, *outputs})) if set(outputs) - set(tensors) else None
    granularity = "per-channel" if per_channel else "per-tensor"
    specs = []
    if first is not None:
        specs.append(Spec(f"int8 ({granularity}), first layer fp32", "int8", per_channel, first, tensors))
    if floats is not None:
        specs.append(Spec(f"int8 ({granularity}), float outputs", "int8", per_channel, best, floats))
    if first is not None and floats is not None:
        specs.append(Spec(f"int8 ({granularity}), first layer fp32, float outputs", "int8", per_channel, first,
                          floats))
    return specs


ROUND_SECONDS = 0.005  # each candidate runs this long per round: a device runs one model back to back


def time_interleaved(cands: list[Timed], inputs: np.ndarray, threads: int, budget_s: float) -> float:
    """Round-robin timing: each round runs every candidate for ~5 ms, until the budget is spent.

    A device runs one model back to back, with its weights in cache; three calls per turn (as before)
    timed every model just after seven others had run, which is not how it will be served. A turn of
    ~5 ms warms each model the way serving does, and rounds still alternate often enough that a load
    change hits every candidate alike.
    """
    sessions = [session(c.path, threads=threads) for c in cands]
    feeds = [{s.get_inputs()[0].name: inputs} for s in sessions]
    calls = []
    for s, f in zip(sessions, feeds, strict=True):  # warm-up: first runs allocate and pack weights
        for _ in range(3):
            s.run(None, f)
        t = time.perf_counter()
        s.run(None, f)
        calls.append(int(min(200, max(3, ROUND_SECONDS / max(time.perf_counter() - t, 1e-6)))))
    started = time.perf_counter()
    while True:
        for c, s, f, n in zip(cands, sessions, feeds, calls, strict=True):
            for _ in range(n):
                t = time.perf_counter()
                s.run(None, f)
                c.latencies_ms.append(1000.0 * (time.perf_counter() - t))
        spent = time.perf_counter() - started
        if spent >= budget_s and min(len(c.latencies_ms) for c in cands) >= MIN_TIMED_CALLS:
            return spent


def score(c: Timed, objective: str) -> float:
    """Lower is better."""
    if objective == "size":
        return float(c.size)
    if objective == "throughput":
        return -(c.throughput or 0.0)
    return c.p50 if c.p50 is not None else float("inf")


def choose(cands: list[Timed], objective: str) -> Timed:
    """The best by the objective; ties (within TIE_TOLERANCE) go to the smaller model."""
    best = min(score(c, objective) for c in cands)
    tied = [c for c in cands if abs(score(c, objective) - best) <= TIE_TOLERANCE * abs(best)]
    return min(tied, key=lambda c: (c.size, score(c, objective)))


def search(
    *,
    gate: GateResult,
    specs: list[Spec],
    fp32_path: Path,
    build: Callable[[Spec], Path],
    evaluate: Callable[[Path], float],
    check: Callable[[float], tuple[MetricCheck, ...]],
    inputs: np.ndarray,
    objective: str,
    threads: int,
    budget_s: float,
    allow_fp32: bool,
    min_coverage: float = 0.0,
) -> Decision:
    """Measure every spec against the gate, time the ones that pass, pick one (see module docstring)."""
    by_path = {c.path: c for c in gate.rounds}
    cands: list[Timed] = []
    for spec in specs:
        path = fp32_path if spec.precision == "fp32" else build(spec)
        known = by_path.get(path)  # a gate round's model: already measured
        metric = known.metric if known is not None else evaluate(path)
        cands.append(Timed(spec, path, metric, check(metric), path.stat().st_size, batch_size=len(inputs),
                           coverage=model_int8_coverage(path)))
    fp32 = Timed(Spec("fp32", "fp32"), fp32_path, gate.fp32, check(gate.fp32), fp32_path.stat().st_size,
                 batch_size=len(inputs))
    cands.append(fp32)
    seen: dict[bytes, Timed] = {}
    for c in cands:
        if not c.passed:
            c.rejected = "failed the accuracy gate: " + "; ".join(
                f"{k.name} {k.measured:.4f} > {k.allowed:.4f}" for k in c.checks if not k.passed)
            continue
        if c.spec.precision == "int8" and c.coverage < min_coverage:
            c.rejected = (f"int8 coverage {100 * c.coverage:.1f}% is under gate.min_int8_coverage "
                          f"{100 * min_coverage:.0f}%")
            continue
        digest = c.path.read_bytes()
        if digest in seen:
            c.rejected = f"same model as '{seen[digest].spec.name}'"
            continue
        seen[digest] = c
    timed = [c for c in cands if c.rejected is None]
    spent = time_interleaved(timed, inputs, threads, budget_s) if objective != "size" or len(timed) > 1 else 0.0
    eligible = [c for c in timed if allow_fp32 or c.spec.precision != "fp32"]
    if not eligible:  # every int8 candidate is under the coverage floor: ship none of them, say why
        eligible = [c for c in cands if c.passed and c.spec.precision == "int8"][:1] or timed
        if not any(c in timed for c in eligible):
            time_interleaved(eligible, inputs, threads, 0.0)
    chosen = choose(eligible, objective)
    for c in timed:
        if c is chosen:
            continue
        if c.spec.precision == "fp32" and not allow_fp32:
            c.rejected = "fp32 is not shipped unless quantize.allow_fp32 = true"
        else:
            c.rejected = _slower(c, chosen, objective)
    log.info("search (%s, batch %d, %d thread(s), %.1f s): chose %s", objective, len(inputs), threads, spent,
             chosen.spec.name)
    return Decision(objective, len(inputs), threads, budget_s, spent, cands, chosen, allow_fp32)


def _slower(c: Timed, chosen: Timed, objective: str) -> str:
    if objective == "size":
        return f"larger: {c.size} B vs {chosen.size} B"
    if objective == "throughput":
        return f"lower throughput: {c.throughput or 0:.1f}/s vs {chosen.throughput or 0:.1f}/s"
    # Rounded as the manifest records p50 (4 decimals), so the reason and the table agree digit for digit.
    mine, best = round(c.p50 or 0.0, 4), round(chosen.p50 or 0.0, 4)
    if chosen.p50 is not None and c.p50 is not None and abs(c.p50 - chosen.p50) <= TIE_TOLERANCE * chosen.p50:
        return f"tied on latency ({mine:.4f} vs {best:.4f} ms p50); the smaller model wins"
    return f"slower: {mine:.4f} ms vs {best:.4f} ms p50"


def timing_inputs(x: np.ndarray, batch_size: int) -> np.ndarray:
    """`batch_size` preprocessed rows (repeated when the split is smaller), float32, contiguous."""
    reps = -(-batch_size // max(len(x), 1))
    return np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:batch_size], dtype=np.float32)


def search_candidates(quantizer: Quantizer, gate: GateResult, settings: QuantizeSection, gate_settings: GateSection,
                      x_test: np.ndarray, y_test: np.ndarray, replay: dict[str, Any] | None = None) -> Decision | None:
    """The build's search: candidates for this quantizer, measured on the held-out split, timed here.

    None when `settings.search_seconds` is 0 (the gate's choice ships). With `replay` (a bundle's
    `quantization.search`) the recorded candidate is rebuilt and nothing is timed.
    """
    from edge_kit.compile.evaluate import accuracy, predict_logits
    from edge_kit.compile.gate import check_budget

    if replay is None and settings.search_seconds <= 0:
        return None

    def evaluate(path: Path) -> float:
        return accuracy(predict_logits(path, x_test), y_test)

    def check(metric: float) -> tuple[MetricCheck, ...]:
        return check_budget(gate_settings.metric, gate.fp32, metric, gate_settings)

    control = quantizer.node_control

    def build_spec(spec: Spec) -> Path:
        if spec.precision == "fp32":
            return quantizer.fp32_path
        for cand in gate.rounds:  # a gate round's model is already built (and measured)
            if ((cand.excluded_nodes, cand.float_tensors) == (spec.excluded_nodes, spec.float_tensors)
                    and spec.per_channel == settings.per_channel):
                return cand.path
        if control is None:
            raise UsageError(f"the {quantizer.backend} backend cannot build candidate {spec.name!r}")
        tag = "".join(ch if ch.isalnum() else "-" for ch in spec.name).strip("-")
        return control.quantize_variant(spec.excluded_nodes, spec.per_channel, tag, spec.float_tensors)

    if replay is not None:
        spec = Spec.from_json(replay["chosen"])
        path = build_spec(spec)
        metric = gate.fp32 if spec.precision == "fp32" else evaluate(path)
        chosen = Timed(spec, path, metric, check(metric), path.stat().st_size, coverage=model_int8_coverage(path))
        return Decision(str(replay.get("objective", settings.objective)),
                        int(replay.get("batch_size", settings.batch_size)),
                        int(replay.get("threads", settings.threads)), 0.0, 0.0, [chosen], chosen,
                        bool(replay.get("allow_fp32", settings.allow_fp32)), replayed=True)
    if control is not None:
        specs = int8_specs(gate, control.dense_nodes(), settings.per_channel) + edge_specs(
            gate, control.first_layer(), control.output_tensors(gate.rounds[0].path), settings.per_channel)
    else:  # no per-node control (inc): its own int8 model, and fp32
        specs = [Spec(f"int8 ({quantizer.backend})", "int8", settings.per_channel, gate.best.excluded_nodes)]
    return search(gate=gate, specs=specs, fp32_path=quantizer.fp32_path, build=build_spec, evaluate=evaluate,
                  check=check, inputs=timing_inputs(x_test, settings.batch_size), objective=settings.objective,
                  threads=settings.threads, budget_s=settings.search_seconds, allow_fp32=settings.allow_fp32,
                  min_coverage=gate_settings.min_int8_coverage)
