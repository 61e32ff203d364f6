"""int8 coverage: the share of multiply-accumulates that run in int8, read from the graph."""

from __future__ import annotations

from pathlib import Path

from calibration import select_calibration
from edge_kit.compile.coverage import int8_coverage, mac_counts, model_int8_coverage
from edge_kit.compile.quantize.ort_quantizer import make_ort_quantizer
from edge_kit.config import QuantizeSection
from tests.helpers.tiny_models import TinyCase

# TinyCnn on 1x8x8: conv1 1->8 3x3 on 8x8, maxpool 2, conv2 8->16 3x3 on 4x4, fc 256 -> 4.
CONV1 = 8 * 8 * 8 * (1 * 3 * 3)
CONV2 = 16 * 4 * 4 * (8 * 3 * 3)
FC = 4 * 256


def test_macs_per_layer_follow_the_architecture(cnn_case: TinyCase) -> None:
    assert mac_counts(cnn_case.onnx) == {"node_conv2d": CONV1, "node_conv2d_1": CONV2, "node_linear": FC}


def test_coverage_of_int8_models_with_and_without_fp32_layers(cnn_case: TinyCase, tmp_path: Path) -> None:
    sel = select_calibration(list(range(len(cnn_case.x_train))), 64, seed=0)
    q = make_ort_quantizer(QuantizeSection(target="auto"), cnn_case.onnx, tmp_path,
                           cnn_case.x_train[sel.positions], sel, None)
    total = CONV1 + CONV2 + FC
    assert model_int8_coverage(q.quantize((), "all")) == 1.0
    assert abs(model_int8_coverage(q.quantize(("node_linear",), "fc")) - (CONV1 + CONV2) / total) < 1e-9
    # The gate's fallback unit for conv1 keeps its reader conv2 in fp32 too: only the classifier stays int8.
    first_fp32 = next(u for u in q.units if u.node == "node_conv2d").members
    assert "node_conv2d_1" in first_fp32
    assert abs(model_int8_coverage(q.quantize(first_fp32, "c1")) - FC / total) < 1e-9
    assert model_int8_coverage(q.fp32_path) == 0.0
    assert int8_coverage({"a": 3, "b": 1}, ["b"]) == 0.25
