"""INC backend pieces that need no training: target refusal and the weight/bias folding pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_kit.compile.qdq_analysis import summarize_qdq
from edge_kit.compile.quantize.inc import fold_weight_quantization, make_inc_quantizer
from edge_kit.config import parse_config
from edge_kit.errors import ConfigError


def test_arm64_is_refused_with_a_pointer_to_the_ort_backend(tmp_path: Path) -> None:
    config = parse_config({"quantize": {"backend": "inc", "target": "arm64"}}, tmp_path / "edgekit.toml")
    with pytest.raises(ConfigError, match=r"quantize\.target.*ort"):
        make_inc_quantizer(config, None, None, np.zeros((1, 4), np.float32), tmp_path)


def _exported_style_model() -> onnx.ModelProto:
    """What torch's exporter writes for an INC-quantized Conv: float weight -> Q -> Clip -> DQ, float bias."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "conv.weight"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(-128, np.int8), "lo"),
        numpy_helper.from_array(np.array(127, np.int8), "hi"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "conv.bias"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["conv.weight", "w_scale", "w_zp"], ["wq"], name="wq", axis=0),
        helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"], name="clip"),
        helper.make_node("DequantizeLinear", ["wc", "w_scale", "w_zp"], ["wd"], name="wd", axis=0),
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="xd"),
        helper.make_node("Conv", ["xd", "wd", "conv.bias"], ["logits"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_folding_stores_int8_weights_and_int32_bias_and_keeps_the_numbers() -> None:
    model = _exported_style_model()
    x = np.random.default_rng(1).uniform(-2, 2, size=(1, 2, 5, 5)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(None, {"input": x})[0])

    before = run(model)
    assert summarize_qdq(model).quantized_nodes == ()  # float weight and bias: ORT runs it in fp32
    folded = fold_weight_quantization(onnx.load_from_string(model.SerializeToString()))
    names = {t.name: t for t in folded.graph.initializer}
    assert names["conv.weight_quantized"].data_type == TensorProto.INT8
    assert names["conv.bias_quantized"].data_type == TensorProto.INT32
    assert "conv.weight" not in names and "conv.bias" not in names  # the float copies are gone
    assert [n.op_type for n in folded.graph.node].count("QuantizeLinear") == 1  # only the activation's
    assert summarize_qdq(folded).quantized_nodes == ("conv",)  # now every Conv input comes through DQ
    # Same weights; the bias is rounded to the int32 grid (scale = input scale x weight scale).
    np.testing.assert_allclose(run(folded), before, atol=0.02 * 0.05)
