"""The accuracy gate: measure fp32 and int8 on the held-out split, and repair before refusing.

Round 0 is plain int8. If it misses the budget, fallback trials measure what each repair gives
back: every layer kept in fp32 with the nodes that read its output (a layer unit), and every
quantized activation tensor kept float on its own (a tensor unit: a Concat or Add output, with the
layers around it still int8). Trials that meet the budget on their own rank first, the one that
keeps the most int8 work (coverage) leading, then the smaller; the rest by accuracy recovered. So the
smallest repair that works comes first: the culprits. Round k keeps the k best-ranked units in
float. The first candidate that meets the budget wins; if none does, the best one is reported with
every round's figures and GateFailedError is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_kit.compile.coverage import model_int8_coverage
from edge_kit.compile.fallback import FallbackUnit
from edge_kit.config import GateSection
from edge_kit.errors import EXIT_GATE_FAILED, EdgeKitError

log = logging.getLogger(__name__)

# Above this many units (layers and tensors) the trials would cost more than the build; the ranking
# then tries only the units with the largest output error (lowest SQNR) first.
MAX_NODE_TRIALS = 24


@dataclass(frozen=True)
class MetricCheck:
    name: str
    measured: float
    allowed: float
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "measured": self.measured, "allowed": self.allowed, "passed": self.passed}


@dataclass(frozen=True)
class Candidate:
    round: int
    excluded_nodes: tuple[str, ...]
    path: Path
    metric: float
    checks: tuple[MetricCheck, ...]
    float_tensors: tuple[str, ...] = ()  # activations whose Q/DQ pair was dropped

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self, fp32: float) -> dict[str, Any]:
        return {
            "round": self.round,
            "excluded_nodes": list(self.excluded_nodes),
            "float_tensors": list(self.float_tensors),
            "int8": self.metric,
            "drop": fp32 - self.metric,
            "passed": self.passed,
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True)
class NodeBlame:
    """A fallback trial: the metric with only this unit kept in float, and what that gives back."""

    node: str  # the layer, or for a tensor unit the tensor's producer
    op_type: str
    members: tuple[str, ...]
    metric_with_node_fp32: float
    recovered: float
    tensors: tuple[str, ...] = ()
    int8_coverage: float | None = None  # of the trial model: what this repair leaves in int8

    @property
    def label(self) -> str:
        return f"tensor {self.tensors[0]}" if self.tensors and not self.members else self.node

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "fp32_nodes": list(self.members),
                "float_tensors": list(self.tensors), "unit": self.label,
                "metric_with_node_fp32": self.metric_with_node_fp32, "recovered": self.recovered,
                "int8_coverage": None if self.int8_coverage is None else round(self.int8_coverage, 4)}


@dataclass
class GateResult:
    metric: str
    fp32: float
    max_drop: float
    max_relative_drop: float | None
    rounds: list[Candidate]
    best: Candidate
    ranking: list[NodeBlame] = field(default_factory=list)
    # The candidate search's choice (name, metric) when it shipped another model than `best`: its own
    # measurement on the held-out split is what the bundle's model scores, so the manifest reports it.
    shipped: tuple[str, float] | None = None

    @property
    def passed(self) -> bool:
        return self.best.passed

    @property
    def shipped_metric(self) -> float:
        """The held-out metric of the model the bundle carries."""
        return self.shipped[1] if self.shipped is not None else self.best.metric

    @property
    def culprits(self) -> list[str]:
        return [b.label for b in self.ranking if b.recovered > 0]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "fp32": self.fp32,
            "int8": self.shipped_metric,  # the shipped model's (int8 unless model.precision says fp32)
            "drop": self.fp32 - self.shipped_metric,
            "max_drop": self.max_drop,
            "max_relative_drop": self.max_relative_drop,
            "passed": self.passed,
            "rounds": [c.to_json(self.fp32) for c in self.rounds],
            "chosen_round": self.best.round,
            "culprits": [b.to_json() for b in self.ranking[:10]],
            **({"shipped_candidate": self.shipped[0], "chosen_round_metric": self.best.metric}
               if self.shipped is not None else {}),
        }


class GateFailedError(EdgeKitError):
    """No candidate met the accuracy budget; no bundle was written. Carries the result and the report path."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, result: GateResult, report: Path | None = None) -> None:
        super().__init__(message, hint="see the report for the culprit nodes and each round's figures")
        self.result = result
        self.report = report


def check_budget(metric: str, fp32: float, int8: float, gate: GateSection) -> tuple[MetricCheck, ...]:
    """Every check the config asks for, all measured before anything is decided."""
    drop = fp32 - int8
    checks = [MetricCheck(f"{metric} drop (absolute)", drop, gate.max_drop, drop <= gate.max_drop + 1e-12)]
    if gate.max_relative_drop is not None:
        relative = drop / fp32 if fp32 > 0 else 0.0
        checks.append(
            MetricCheck(f"{metric} drop (relative)", relative, gate.max_relative_drop,
                        relative <= gate.max_relative_drop + 1e-12)
        )
    return tuple(checks)


class QuantizeFn(Protocol):
    def __call__(self, excluded: tuple[str, ...], tag: str, float_tensors: tuple[str, ...] = ()) -> Path:
        """The int8 model with `excluded` nodes in fp32 and `float_tensors` left unquantized."""
        ...


EvaluateFn = Callable[[Path], float]


def run_gate(
    *,
    gate: GateSection,
    fp32_metric: float,
    quantize: QuantizeFn,
    evaluate: EvaluateFn,
    units: Sequence[FallbackUnit],
    tensor_units: Callable[[Path], list[FallbackUnit]] | None = None,
    prefilter: Callable[[Path, list[FallbackUnit]], list[FallbackUnit]] | None = None,
) -> GateResult:
    """Run round 0 and, while the budget is missed, up to `gate.max_fallback_rounds` fallback rounds.

    `units` are the layers that may be kept in fp32 (see `edge_kit.compile.fallback`); `tensor_units`,
    given round 0's model, lists its quantized activations; `prefilter`, given round 0's model, orders
    the units by a cheap error signal when there are too many to trial each.
    """
    metric = gate.metric

    def candidate(round_no: int, excluded: tuple[str, ...], tag: str, tensors: tuple[str, ...] = ()) -> Candidate:
        path = quantize(excluded, tag, float_tensors=tensors) if tensors else quantize(excluded, tag)
        value = evaluate(path)
        return Candidate(round_no, excluded, path, value, check_budget(metric, fp32_metric, value, gate), tensors)

    base = candidate(0, (), "round0")
    result = GateResult(metric, fp32_metric, gate.max_drop, gate.max_relative_drop, [base], base)
    log.info("gate round 0 (plain int8): %s %.4f vs fp32 %.4f", metric, base.metric, fp32_metric)
    if base.passed or gate.max_fallback_rounds == 0:
        return result
    trials = list(units) + (tensor_units(base.path) if tensor_units is not None else [])
    if not trials:
        return result

    if len(trials) > MAX_NODE_TRIALS and prefilter is not None:
        trials = prefilter(base.path, trials)
    trials = trials[:MAX_NODE_TRIALS]
    ranking: list[NodeBlame] = []
    enough: set[int] = set()  # trials that meet the budget on their own
    for i, unit in enumerate(trials):
        trial = candidate(-1, unit.members, f"trial{i}", unit.tensors)
        blame = NodeBlame(unit.node, unit.op_type, unit.members, trial.metric, trial.metric - base.metric,
                          unit.tensors, model_int8_coverage(trial.path))
        ranking.append(blame)
        if trial.passed:
            enough.add(id(blame))

    def rank(b: NodeBlame) -> tuple[bool, float, float, float]:
        # A repair that is enough alone comes first, the one keeping the most int8 work leading (a layer
        # unit that puts the whole model in fp32 recovers most, but is the worst fix), then the one that
        # keeps fewer things float (one tensor before a layer with its readers: both pass, so a last
        # point of accuracy, which differs between hosts' kernels, does not decide). The others by
        # accuracy recovered, then int8 work kept, then size. Stable sort: graph order after that.
        coverage, size = b.int8_coverage or 0.0, len(b.members) + len(b.tensors)
        if id(b) in enough:
            return (False, -coverage, size, -b.recovered)
        return (True, -b.recovered, -coverage, size)

    ranking.sort(key=rank)
    result.ranking = ranking
    log.info("gate fallback ranking: %s", ", ".join(f"{b.label} (+{b.recovered:.4f})" for b in ranking[:5]))

    for k in range(1, min(gate.max_fallback_rounds, len(ranking)) + 1):
        excluded = tuple(sorted({m for b in ranking[:k] for m in b.members}))
        tensors = tuple(sorted({t for b in ranking[:k] for t in b.tensors}))
        cand = candidate(k, excluded, f"round{k}", tensors)
        result.rounds.append(cand)
        log.info("gate round %d (%d unit(s) in float): %s %.4f", k, k, metric, cand.metric)
        if cand.passed:
            result.best = cand
            return result
    result.best = max(result.rounds, key=lambda c: (c.metric, -c.round))
    return result
