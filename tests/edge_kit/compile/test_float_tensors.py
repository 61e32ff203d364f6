"""Keeping one activation tensor float in a QDQ model: exactly that pair goes, nothing else changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration import select_calibration
from edge_kit.compile.float_tensors import keep_float, quantized_activations
from edge_kit.compile.quantize.ort_quantizer import OrtQuantizer, make_ort_quantizer
from edge_kit.config import QuantizeSection
from tests.helpers.tiny_models import TinyCase


@pytest.fixture(scope="module")
def quantizer(stretch_case: TinyCase, tmp_path_factory: pytest.TempPathFactory) -> OrtQuantizer:
    sel = select_calibration(list(range(len(stretch_case.x_train))), 128, seed=0)
    return make_ort_quantizer(QuantizeSection(target="auto"), stretch_case.onnx, tmp_path_factory.mktemp("q"),
                              stretch_case.x_train[sel.positions], sel, None)


def _run_unoptimised(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Plain ONNX semantics (no fused int8 kernels, which differ between AVX2 and VNNI hosts)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def test_quantized_activations_name_fp32_tensors_including_the_graph_output(quantizer: OrtQuantizer) -> None:
    model = onnx.load(str(quantizer.quantize((), "plain")))
    found = {t.name: t for t in quantized_activations(model)}
    fp32 = onnx.load(str(quantizer.fp32_path))
    activations = {o for n in fp32.graph.node for o in n.output} | {"input"}
    assert set(found) <= activations  # names as in the fp32 model, never ORT's renamed ones
    assert "logits" in found and found["logits"].source == "logits_QuantizeLinear_Input"
    concat = next(n for n in fp32.graph.node if n.op_type == "Concat")
    assert found[concat.output[0]].producer == concat.name and found[concat.output[0]].producer_op == "Concat"
    assert found["input"].producer == "" and found["input"].producer_op == "input"


def test_keep_float_drops_exactly_one_pair_and_readers_take_the_float_tensor(quantizer: OrtQuantizer,
                                                                             stretch_case: TinyCase) -> None:
    model = onnx.load(str(quantizer.quantize((), "plain")))
    concat = next(n.output[0] for n in onnx.load(str(quantizer.fp32_path)).graph.node if n.op_type == "Concat")
    kept = keep_float(model, [concat])
    onnx.checker.check_model(kept)
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(kept, "QuantizeLinear") == count(model, "QuantizeLinear") - 1
    assert count(kept, "DequantizeLinear") == count(model, "DequantizeLinear") - 1
    head = next(n for n in kept.graph.node if n.op_type == "Gemm" and concat in n.input)
    assert head.input[0] == concat
    assert concat not in {t.name for t in quantized_activations(kept)}
    # The original is untouched (a copy is returned).
    assert count(model, "QuantizeLinear") == count(onnx.load(str(quantizer.quantize((), "plain2"))), "QuantizeLinear")
    # Unoptimised, the float Concat output fixes the classifier: at least as accurate as plain int8.
    x = stretch_case.x_test
    plain = (_run_unoptimised(model, x).argmax(1) == stretch_case.y_test).mean()
    fixed = (_run_unoptimised(kept, x).argmax(1) == stretch_case.y_test).mean()
    assert plain < 0.4 < 0.95 < fixed


def test_keeping_the_graph_output_float_changes_it_by_at_most_half_an_output_step(quantizer: OrtQuantizer,
                                                                                  stretch_case: TinyCase) -> None:
    concat = next(n.output[0] for n in onnx.load(str(quantizer.fp32_path)).graph.node if n.op_type == "Concat")
    model = keep_float(onnx.load(str(quantizer.quantize((), "plain"))), [concat])  # logits that carry signal
    kept = keep_float(model, ["logits"])
    assert [o.name for o in kept.graph.output] == ["logits"]
    scale = next(float(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer if t.name == "logits_scale")
    x = stretch_case.x_test[:64]
    diff = np.abs(_run_unoptimised(kept, x) - _run_unoptimised(model, x))
    assert diff.max() <= scale / 2 + 1e-5 and diff.max() > 0  # only the output rounding went away


def test_an_unknown_tensor_is_refused_by_name_and_an_already_float_one_is_left_alone(
    quantizer: OrtQuantizer,
) -> None:
    model = onnx.load(str(quantizer.quantize((), "plain")))
    with pytest.raises(ValueError, match="no_such_tensor"):
        keep_float(model, ["no_such_tensor", "logits"])
    # The search's "dense layers fp32" candidate keeps the Concat in fp32 too, so its output has no pair:
    # nothing to do, nothing refused.
    concat = next(n.output[0] for n in onnx.load(str(quantizer.fp32_path)).graph.node if n.op_type == "Concat")
    dense = onnx.load(str(quantizer.quantize(quantizer.dense_nodes(), "dense")))
    assert concat not in {t.name for t in quantized_activations(dense)}
    assert keep_float(dense, [concat]).SerializeToString() == dense.SerializeToString()


def test_a_recorded_tensor_choice_rebuilds_byte_for_byte(quantizer: OrtQuantizer, tmp_path: Path) -> None:
    concat = next(n.output[0] for n in onnx.load(str(quantizer.fp32_path)).graph.node if n.op_type == "Concat")
    a = quantizer.quantize((), "a", float_tensors=(concat,)).read_bytes()
    b = quantizer.quantize_variant((), quantizer.settings.per_channel, "b", (concat,)).read_bytes()
    assert a == b
