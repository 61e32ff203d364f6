"""ORT backend: QDQ structure, int8 dtypes, target presets, determinism, unsupported ops stay fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from calibration import select_calibration
from edge_kit.compile.evaluate import accuracy, predict_logits
from edge_kit.compile.qdq_analysis import summarize_qdq
from edge_kit.compile.quantize.ort_quantizer import make_ort_quantizer
from edge_kit.config import QuantizeSection
from tests.helpers.tiny_models import TinyCase, export_onnx


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
    # The host's preset: x86-vnni's fused u8 x s8 Gemm saturates on an AVX2-only host (0.25 off here).
    q = _quantizer(case, tmp_path / "q", target="auto")
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


def _plain_ort(q, out: Path, target: str = "x86-vnni") -> Path:
    """The same quantization straight from ORT's quantize_static, nothing edited afterwards."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from calibration.ranges import quantizable_op_types
    from edge_kit.compile.quantize.ort import target_preset

    preset = target_preset(target)
    quantize_static(str(q.fp32_path), str(out), None, calibration_cache_path=str(q.ranges.cache_path),
                    calibrate_method=q.ranges.preset.method, quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=preset.reduce_range, activation_type=preset.activation_type,
                    weight_type=preset.weight_type, op_types_to_quantize=quantizable_op_types())
    return out


def _run(path: Path, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_quantized_model_keeps_every_int8_fusion_ort_makes_with_a_linear_head(cnn_case: TinyCase,
                                                                                tmp_path: Path) -> None:
    """The cnn ends in a Linear (Gemm): ORT must fuse it to QGemm in our model as in its own output.

    Fused int8 kernels differ bit-wise between hosts (AVX2 vs AVX-512 VNNI, and by zero-point inputs),
    so this compares graph structure, the unfused graphs exactly, and accuracy; never fused bits.
    """
    from edge_kit.compile.fusion import float_compute_ops, fused_int8_ops

    q = _quantizer(cnn_case, tmp_path, target="x86-vnni")
    ours = q.quantize((), "x")
    plain = _plain_ort(q, tmp_path / "ort.onnx")
    fused = fused_int8_ops(ours)
    assert fused == fused_int8_ops(plain)
    assert fused["QGemm"] == 1 and fused["QLinearConv"] == 2
    assert not float_compute_ops(ours)  # no float Gemm/Conv and no per-inference weight dequantization
    x = cnn_case.x_test
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(_run(ours, x, off), _run(plain, x, off))
    fp32 = accuracy(predict_logits(q.fp32_path, x), cnn_case.y_test)
    assert fp32 - accuracy(predict_logits(ours, x), cnn_case.y_test) <= 0.01  # the default gate budget


def test_fused_and_unfused_int8_agree_on_this_host_only_where_the_preset_fits(cnn_case: TinyCase,
                                                                               tmp_path: Path) -> None:
    """The x86-avx2 preset (7-bit weights) cannot saturate AVX2's u8 x s8 pair sums, so its fused kernels
    stay close to the unfused QDQ reference on every x86 host; x86-vnni's only do on VNNI hosts, which is
    why the build warns when the preset does not match the host."""
    from edge_kit.compile.quantize.ort import host_target

    x = cnn_case.x_test
    ref = predict_logits(cnn_case.onnx, x)
    step = np.abs(ref).max() / 127  # about one output quantization step
    q = _quantizer(cnn_case, tmp_path / "a", target="x86-avx2")
    path = q.quantize((), "a")
    fused = _run(path, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    unfused = _run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.abs(fused - unfused).max() <= 2 * step
    if host_target() == "x86-vnni":  # VNNI's vpdpbusd accumulates in int32: no saturation with 8-bit weights
        v = _quantizer(cnn_case, tmp_path / "v", target="x86-vnni").quantize((), "v")
        on = _run(v, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        assert np.abs(on - _run(v, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)).max() <= 2 * step


def test_auto_target_picks_the_preset_for_the_host_and_a_mismatch_is_a_warning() -> None:
    from edge_kit.compile.quantize.ort import host_target, resolve_target

    assert host_target("AVX2 (no VNNI)") == "x86-avx2"
    assert host_target("AVX-512 VNNI") == "x86-vnni" and host_target("AMX-INT8") == "x86-vnni"
    assert host_target("Arm dot product") == "arm64"
    assert resolve_target("auto", "AVX2 (no VNNI)") == ("x86-avx2", None)
    assert resolve_target("x86-avx2", "AVX2 (no VNNI)") == ("x86-avx2", None)
    target, warning = resolve_target("x86-vnni", "AVX2 (no VNNI)")
    assert target == "x86-vnni" and warning is not None and "does not match this build host" in warning
    assert resolve_target("auto")[0] == host_target()


def test_the_manifest_description_names_the_host_and_the_resolved_target(cnn_case: TinyCase,
                                                                          tmp_path: Path) -> None:
    from device_agent.host import int8_isa
    from edge_kit.compile.quantize.ort import host_target

    d = _quantizer(cnn_case, tmp_path, target="auto").describe()
    assert d["target"] == host_target() and d["target_requested"] == "auto"
    assert d["host"]["int8_isa"] == int8_isa() and d["host"]["cpu"]
