"""The accuracy gate: budget checks, and a quantization-sensitive model repaired by fallback."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from calibration import select_calibration
from edge_kit.compile.evaluate import accuracy, predict_logits
from edge_kit.compile.gate import check_budget, run_gate
from edge_kit.compile.qdq_analysis import summarize_qdq
from edge_kit.compile.quantize.ort_quantizer import OrtQuantizer, make_ort_quantizer
from edge_kit.config import GateSection, QuantizeSection
from edge_kit.ship.report import ReportInputs, render_report
from tests.helpers.tiny_models import TinyCase


def test_budget_reports_every_check_measured_against_allowed() -> None:
    checks = check_budget("accuracy", 0.90, 0.885, GateSection(max_drop=0.01, max_relative_drop=0.02))
    assert [(c.name, round(c.measured, 4), c.allowed, c.passed) for c in checks] == [
        ("accuracy drop (absolute)", 0.015, 0.01, False),
        ("accuracy drop (relative)", round(0.015 / 0.9, 4), 0.02, True),
    ]


def _outlier_quantizer(case: TinyCase, tmp: Path) -> OrtQuantizer:
    sel = select_calibration(list(range(len(case.x_train))), 256, seed=0)
    return make_ort_quantizer(QuantizeSection(target="auto"), case.onnx, tmp, case.x_train[sel.positions], sel, None)


def _outlier_layer(q: OrtQuantizer) -> str:
    """The node that multiplies by `outlier.weight`: the layer built to carry the huge activations."""
    model = onnx.load(str(q.fp32_path))
    return next(n.name for n in model.graph.node if "outlier.weight" in n.input)


def _gate(case: TinyCase, q: OrtQuantizer, gate: GateSection):
    fp32 = accuracy(predict_logits(q.fp32_path, case.x_test), case.y_test)
    return run_gate(gate=gate, fp32_metric=fp32, quantize=q.quantize,
                    evaluate=lambda p: accuracy(predict_logits(p, case.x_test), case.y_test), units=q.units)


@pytest.mark.slow
def test_outlier_layer_fails_plain_int8_and_fallback_repairs_it(outlier_case: TinyCase, tmp_path: Path) -> None:
    q = _outlier_quantizer(outlier_case, tmp_path)
    result = _gate(outlier_case, q, GateSection(max_drop=0.02, max_fallback_rounds=3))
    plain = result.rounds[0]
    assert result.fp32 == 1.0
    assert not plain.passed and plain.metric < 0.6  # plain int8 collapses
    assert result.passed and result.best.round >= 1
    culprit = _outlier_layer(q)
    assert result.ranking[0].node == culprit and result.ranking[0].recovered > 0.5
    assert culprit in result.best.excluded_nodes
    # Most of the model still runs int8: the embedding and the head are quantized.
    s = summarize_qdq(result.best.path, result.best.excluded_nodes)
    assert len(s.quantized_nodes) >= 1 and s.int8_initializers >= 2
    manifest = result.to_manifest()
    assert manifest["passed"] and manifest["culprits"][0]["node"] == culprit
    assert [r["passed"] for r in manifest["rounds"]][-1] is True


@pytest.mark.slow
def test_without_fallback_rounds_the_gate_fails_and_the_report_names_the_culprit(
    outlier_case: TinyCase, tmp_path: Path
) -> None:
    q = _outlier_quantizer(outlier_case, tmp_path)
    no_rounds = _gate(outlier_case, q, GateSection(max_drop=0.02, max_fallback_rounds=0))
    assert not no_rounds.passed and len(no_rounds.rounds) == 1 and no_rounds.ranking == []

    # An impossible budget: fallback runs every round it may, keeps the best, still fails.
    strict = _gate(outlier_case, q, GateSection(max_drop=0.0, max_relative_drop=0.0, max_fallback_rounds=2))
    assert not strict.passed and len(strict.rounds) == 3
    assert strict.best.metric == max(c.metric for c in strict.rounds)
    culprit = _outlier_layer(q)
    report = render_report(ReportInputs("toy", "1", strict, q.describe(), {"method": "minmax"}, None))
    assert "**Accuracy gate: FAILED**" in report
    assert f"Culprits: `{culprit}`" in report
    assert "| 0 | none (plain int8) |" in report and "| 2 |" in report
    assert "No bundle was written" in report


def test_sqnr_signal_puts_the_outlier_layer_first(outlier_case: TinyCase, tmp_path: Path) -> None:
    from edge_kit.compile.sqnr import order_by_sqnr, tensor_sqnr

    q = _outlier_quantizer(outlier_case, tmp_path)
    int8 = q.quantize((), "plain")
    sqnr = tensor_sqnr(q.fp32_path, int8, outlier_case.x_test[:32])
    assert sqnr and min(sqnr.values()) < 10 < max(sqnr.values())  # one tensor ruined, others fine
    ordered = order_by_sqnr(q.fp32_path, int8, list(reversed(q.units)), outlier_case.x_test[:32])
    assert ordered[0].node == _outlier_layer(q)
    # Through the gate: with fewer trials allowed than units, the prefilter still finds the culprit.
    import edge_kit.compile.gate as gate_module

    original = gate_module.MAX_NODE_TRIALS
    gate_module.MAX_NODE_TRIALS = 1
    try:
        fp32 = accuracy(predict_logits(q.fp32_path, outlier_case.x_test), outlier_case.y_test)
        result = run_gate(gate=GateSection(max_drop=0.02, max_fallback_rounds=1), fp32_metric=fp32,
                          quantize=q.quantize, units=list(reversed(q.units)), prefilter=q.prefilter,
                          evaluate=lambda p: accuracy(predict_logits(p, outlier_case.x_test), outlier_case.y_test))
    finally:
        gate_module.MAX_NODE_TRIALS = original
    assert [b.node for b in result.ranking] == [_outlier_layer(q)] and result.passed


def _concat_output(q: OrtQuantizer) -> str:
    model = onnx.load(str(q.fp32_path))
    return next(n.output[0] for n in model.graph.node if n.op_type == "Concat")


@pytest.mark.slow
def test_a_stretched_concat_is_repaired_by_keeping_that_tensor_float_not_the_whole_model(
    stretch_case: TinyCase, tmp_path: Path
) -> None:
    from edge_kit.compile.coverage import model_int8_coverage
    from edge_kit.compile.fusion import fused_int8_ops

    q = _outlier_quantizer(stretch_case, tmp_path)
    gate = GateSection(max_drop=0.02, max_fallback_rounds=2)
    # Layer units alone: the only repair that works keeps every node in fp32 (what the gate did before).
    by_layer = _gate(stretch_case, q, gate)
    assert not by_layer.rounds[0].passed and by_layer.rounds[0].metric < 0.4  # plain int8 near chance (4 classes)
    assert by_layer.passed and model_int8_coverage(by_layer.best.path) == 0.0

    fp32 = accuracy(predict_logits(q.fp32_path, stretch_case.x_test), stretch_case.y_test)
    result = run_gate(gate=gate, fp32_metric=fp32, quantize=q.quantize, units=q.units, tensor_units=q.tensor_units,
                      evaluate=lambda p: accuracy(predict_logits(p, stretch_case.x_test), stretch_case.y_test))
    stretched = _concat_output(q)
    top = result.ranking[0]
    assert top.label == f"tensor {stretched}" and top.members == () and top.int8_coverage is not None
    # The whole-model layer unit recovers as much or more, but ranks below the smaller repair.
    everything = next(b for b in result.ranking if b.int8_coverage == 0.0)
    assert everything.recovered >= top.recovered and result.ranking.index(everything) > 0
    assert result.passed and result.best.round == 1
    assert result.best.excluded_nodes == () and result.best.float_tensors == (stretched,)
    # The first layer still runs int8 (ORT fuses it to QGemm); only the classifier reads a float tensor.
    first = next(n.name for n in onnx.load(str(q.fp32_path)).graph.node if n.op_type == "Gemm")
    summary = summarize_qdq(result.best.path, (), result.best.float_tensors)
    assert summary.quantized_nodes == (first,)
    assert any(n.op_type == "Gemm" and stretched in n.reason for n in summary.fp32_nodes)
    assert fused_int8_ops(result.best.path)["QGemm"] == 1
    assert model_int8_coverage(result.best.path) >= 0.5
    manifest = result.to_manifest()
    assert manifest["culprits"][0]["float_tensors"] == [stretched]
    assert manifest["rounds"][1]["float_tensors"] == [stretched]
    report = render_report(ReportInputs("toy", "1", result, q.describe(), {"method": "minmax"}, None))
    assert f"| 1 | tensor `{stretched}` |" in report
