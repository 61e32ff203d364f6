"""ORT backend: QDQ structure, int8 dtypes, target presets, determinism, unsupported ops stay fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from calibration import select_calibration
from edge_kit.compile.evaluate import accuracy, predict_logits
from edge_kit.compile.qdq_analysis import summarize_qdq
from edge_kit.compile.quantize import make_ort_quantizer
from edge_kit.config import QuantizeSection
from tests.tiny_models import TinyCase, export_onnx


def _quantizer(case: TinyCase, tmp: Path, **settings: object):
    sel = select_calibration(list(range(len(case.x_train))), 128, seed=0)
    return make_ort_quantizer(QuantizeSection(**settings), case.onnx, tmp, case.x_train[sel.positions], sel, None)


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_vnni_preset_gives_qdq_with_int8_weights_and_uint8_activations(cnn_case: TinyCase, tmp_path: Path) -> None:
    q = _quantizer(cnn_case, tmp_path, target="x86-vnni", per_channel=True)
    path = q.quantize((), "t")
    model = onnx.load(str(path))
    s = summarize_qdq(model)
    # input, conv1 out, pool out, conv2 out, flatten/fc in, logits: activations quantized; 2 convs + fc weights
    assert s.quantize_nodes >= 4 and s.dequantize_nodes >= s.quantize_nodes + 3
    assert {"node_conv2d", "node_conv2d_1", "node_linear"} <= set(s.quantized_nodes)
    assert s.fp32_nodes == ()
    weights = [t for t in model.graph.initializer if t.name.endswith("weight_quantized")]
    assert len(weights) == 3 and all(t.data_type == TensorProto.INT8 for t in weights)
    act_zero_points = [t for t in model.graph.initializer if t.name.endswith("_zero_point")
                       and "weight" not in t.name and "bias" not in t.name]
    assert act_zero_points and all(t.data_type == TensorProto.UINT8 for t in act_zero_points)
    # per-channel: one scale per output channel of conv2 (16)
    assert onnx.numpy_helper.to_array(_initializer(model, "conv2.weight_scale")).shape == (16,)
    x = cnn_case.x_test
    fp32 = accuracy(predict_logits(q.fp32_path, x), cnn_case.y_test)
    int8 = accuracy(predict_logits(path, x), cnn_case.y_test)
    assert fp32 > 0.9 and abs(fp32 - int8) <= 0.02
    ref, got = predict_logits(q.fp32_path, x), predict_logits(path, x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()


def test_arm64_preset_uses_signed_activations_and_avx2_reduces_range(cnn_case: TinyCase, tmp_path: Path) -> None:
    arm = onnx.load(str(_quantizer(cnn_case, tmp_path / "a", target="arm64").quantize((), "a")))
    assert _initializer(arm, "input_zero_point").data_type == TensorProto.INT8
    vnni = onnx.load(str(_quantizer(cnn_case, tmp_path / "v", target="x86-vnni").quantize((), "v")))
    avx2 = onnx.load(str(_quantizer(cnn_case, tmp_path / "b", target="x86-avx2").quantize((), "b")))
    w_vnni = onnx.numpy_helper.to_array(_initializer(vnni, "conv2.weight_quantized"))
    w_avx2 = onnx.numpy_helper.to_array(_initializer(avx2, "conv2.weight_quantized"))
    assert np.abs(w_vnni).max() > 64  # full 8-bit range
    assert np.abs(w_avx2).max() <= 64  # reduce_range: 7-bit weights


def test_per_tensor_when_per_channel_is_off(cnn_case: TinyCase, tmp_path: Path) -> None:
    model = onnx.load(str(_quantizer(cnn_case, tmp_path, per_channel=False).quantize((), "t")))
    assert onnx.numpy_helper.to_array(_initializer(model, "conv2.weight_scale")).shape == ()


def test_same_inputs_give_byte_identical_models(cnn_case: TinyCase, tmp_path: Path) -> None:
    a = _quantizer(cnn_case, tmp_path / "1").quantize((), "x").read_bytes()
    b = _quantizer(cnn_case, tmp_path / "2").quantize((), "x").read_bytes()
    assert a == b


def test_excluded_nodes_stay_fp32_and_are_named(cnn_case: TinyCase, tmp_path: Path) -> None:
    q = _quantizer(cnn_case, tmp_path)
    path = q.quantize(("node_linear",), "x")
    s = summarize_qdq(path, ("node_linear",))
    assert "node_linear" not in s.quantized_nodes
    assert [(n.name, n.reason) for n in s.fp32_nodes] == [
        ("node_linear", "kept in fp32 by the accuracy gate's fallback")]


class _WithSin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sin(self.fc1(x)))


def test_op_without_int8_form_stays_fp32_and_is_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    path = export_onnx(_WithSin().eval(), torch.from_numpy(x[:2]), tmp_path / "sin.onnx")
    case = TinyCase(path, x, np.zeros(64, dtype=np.int64), x, np.zeros(64, dtype=np.int64))
    q = _quantizer(case, tmp_path / "q")
    out = q.quantize((), "s")
    s = summarize_qdq(out)
    sin = [n for n in s.fp32_nodes if n.op_type == "Sin"]
    assert len(sin) == 1 and sin[0].reason == "no int8 form in ONNX Runtime's quantizer"
    assert len(s.quantized_nodes) == 2  # both Gemms still int8
    np.testing.assert_allclose(predict_logits(out, x), predict_logits(q.fp32_path, x), atol=0.1)


def test_unknown_node_to_exclude_is_refused(cnn_case: TinyCase, tmp_path: Path) -> None:
    from edge_kit.errors import UsageError

    with pytest.raises(UsageError, match="not in the model: nope"):
        _quantizer(cnn_case, tmp_path).quantize(("nope",), "x")


def test_all_zero_zero_points_are_dropped_with_identical_outputs(cnn_case: TinyCase, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from edge_kit.compile.quantize.ort import drop_zero_zero_points

    q = _quantizer(cnn_case, tmp_path)
    ours = onnx.load(str(q.quantize((), "x")))
    # The same quantization without the post-pass, straight from ORT.
    reference = tmp_path / "ort.onnx"
    quantize_static(str(q.fp32_path), str(reference), None, calibration_cache_path=str(q.ranges.cache_path),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=None)
    raw = onnx.load(str(reference))
    assert drop_zero_zero_points(onnx.load(str(reference))) > 0
    inits = {t.name: t for t in ours.graph.initializer}
    for node in ours.graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3:
            zp = inits[node.input[2]]
            assert zp.data_type == TensorProto.UINT8 or onnx.numpy_helper.to_array(zp).any()
    assert len(ours.SerializeToString()) < len(raw.SerializeToString())
    # Activation zero points (uint8, non-zero) stay; outputs are bit-identical.
    assert any(t.name == "input_zero_point" for t in ours.graph.initializer)
    x = cnn_case.x_test
    np.testing.assert_array_equal(predict_logits(reference, x), predict_logits(tmp_path / "int8-x.onnx", x))
