"""The accuracy gate: measure fp32 and int8 on the held-out split, and repair before refusing.

Round 0 is plain int8. If it misses the budget, every quantized node gets a fallback trial
(quantize again with only that node in fp32, measure) and the nodes are ranked by how much
accuracy keeping them in fp32 gives back: the culprits. Round k keeps the k worst in fp32. The
first candidate that meets the budget wins (fewest fp32 nodes, so most of the speed-up stays);
if none does, the best one is reported with every round's figures and GateFailedError is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_kit.compile.fallback import FallbackUnit
from edge_kit.config import GateSection
from edge_kit.errors import EXIT_GATE_FAILED, EdgeKitError

log = logging.getLogger(__name__)

# Above this many quantized nodes the per-node trials would cost more than the build; the ranking
# then tries only the nodes with the largest output error (lowest SQNR) first.
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

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_json(self, fp32: float) -> dict[str, Any]:
        return {
            "round": self.round,
            "excluded_nodes": list(self.excluded_nodes),
            "int8": self.metric,
            "drop": fp32 - self.metric,
            "passed": self.passed,
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True)
class NodeBlame:
    """A fallback trial: the metric with only this node kept in fp32, and what that gives back."""

    node: str
    op_type: str
    members: tuple[str, ...]
    metric_with_node_fp32: float
    recovered: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "fp32_nodes": list(self.members),
                "metric_with_node_fp32": self.metric_with_node_fp32, "recovered": self.recovered}


@dataclass
class GateResult:
    metric: str
    fp32: float
    max_drop: float
    max_relative_drop: float | None
    rounds: list[Candidate]
    best: Candidate
    ranking: list[NodeBlame] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.best.passed

    @property
    def culprits(self) -> list[str]:
        return [b.node for b in self.ranking if b.recovered > 0]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "fp32": self.fp32,
            "int8": self.best.metric,
            "drop": self.fp32 - self.best.metric,
            "max_drop": self.max_drop,
            "max_relative_drop": self.max_relative_drop,
            "passed": self.passed,
            "rounds": [c.to_json(self.fp32) for c in self.rounds],
            "chosen_round": self.best.round,
            "culprits": [b.to_json() for b in self.ranking[:10]],
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


QuantizeFn = Callable[[tuple[str, ...], str], Path]  # (nodes kept fp32, tag) -> int8 model path
EvaluateFn = Callable[[Path], float]


def run_gate(
    *,
    gate: GateSection,
    fp32_metric: float,
    quantize: QuantizeFn,
    evaluate: EvaluateFn,
    units: Sequence[FallbackUnit],
    prefilter: Callable[[Path, list[FallbackUnit]], list[FallbackUnit]] | None = None,
) -> GateResult:
    """Run round 0 and, while the budget is missed, up to `gate.max_fallback_rounds` fallback rounds.

    `units` are the layers that may be kept in fp32 (see `edge_kit.compile.fallback`); `prefilter`, given
    round 0's model, orders them by a cheap error signal when there are too many to trial each.
    """
    metric = gate.metric

    def candidate(round_no: int, excluded: tuple[str, ...], tag: str) -> Candidate:
        path = quantize(excluded, tag)
        value = evaluate(path)
        return Candidate(round_no, excluded, path, value, check_budget(metric, fp32_metric, value, gate))

    base = candidate(0, (), "round0")
    result = GateResult(metric, fp32_metric, gate.max_drop, gate.max_relative_drop, [base], base)
    log.info("gate round 0 (plain int8): %s %.4f vs fp32 %.4f", metric, base.metric, fp32_metric)
    if base.passed or gate.max_fallback_rounds == 0 or not units:
        return result

    trials = list(units)
    if len(trials) > MAX_NODE_TRIALS and prefilter is not None:
        trials = prefilter(base.path, trials)
    trials = trials[:MAX_NODE_TRIALS]
    ranking: list[NodeBlame] = []
    for i, unit in enumerate(trials):
        trial = candidate(-1, unit.members, f"trial{i}")
        ranking.append(NodeBlame(unit.node, unit.op_type, unit.members, trial.metric, trial.metric - base.metric))
    # Stable sort: most recovered first, ties in graph order.
    ranking.sort(key=lambda b: -b.recovered)
    result.ranking = ranking
    log.info("gate fallback ranking: %s", ", ".join(f"{b.node} (+{b.recovered:.4f})" for b in ranking[:5]))

    for k in range(1, min(gate.max_fallback_rounds, len(ranking)) + 1):
        excluded = tuple(sorted({m for b in ranking[:k] for m in b.members}))
        cand = candidate(k, excluded, f"round{k}")
        result.rounds.append(cand)
        log.info("gate round %d (%d node(s) in fp32): %s %.4f", k, k, metric, cand.metric)
        if cand.passed:
            result.best = cand
            return result
    result.best = max(result.rounds, key=lambda c: (c.metric, -c.round))
    return result
