"""Test bundles made in code: a digits-shaped CNN (onnx.helper, seeded weights), written with the
same `device_agent.bundle.format.write_bundle` the build server uses, with reference histograms and a
self-test computed by ONNX Runtime exactly as the compiler does.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from device_agent.bundle.format import REFERENCE, REPORT, SELFTEST, canonical_json, write_bundle
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import build_reference

INPUT_SHAPE = (1, 8, 8)
LABELS = [str(i) for i in range(10)]
MEAN, STD = 4.9, 6.0


def digits_like_inputs(n: int, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """Raw 8x8 'images' with pixel values 0..16 like sklearn's digits; `shift` brightens them (drift)."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.2, 4.0, size=(n, *INPUT_SHAPE))
    return np.clip(base + shift, 0, 16).astype(np.float32)


def cnn_model(seed: int = 0, width: int = 8) -> onnx.ModelProto:
    """Conv(1->w) ReLU Conv(w->2w, stride 2) ReLU Flatten Gemm(->64) ReLU Gemm(->10): digits-sized."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    w2 = 2 * width
    flat = w2 * 4 * 4
    inits = [
        init("c1_w", width, 1, 3, 3, scale=0.5), init("c1_b", width, scale=0.1),
        init("c2_w", w2, width, 3, 3, scale=0.2), init("c2_b", w2, scale=0.1),
        init("f1_w", 64, flat, scale=0.1), init("f1_b", 64, scale=0.1),
        init("f2_w", 10, 64, scale=0.2), init("f2_b", 10, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "f1_w", "f1_b"], ["f1"], transB=1),
        helper.make_node("Relu", ["f1"], ["r3"]),
        helper.make_node("Gemm", ["r3", "f2_w", "f2_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_like_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def quantize_int8(model: onnx.ModelProto, calibration: np.ndarray) -> bytes:
    """Static int8 QDQ quantization with ONNX Runtime's tool, as the compiler's `ort` backend does."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def run_model(model_bytes: bytes, raw: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": ((raw - MEAN) / STD).astype(np.float32)})[0])


def make_bundle(
    out_dir: Path,
    *,
    seed: int = 0,
    version: str = "1.0.0",
    name: str = "digits",
    signing_key: Ed25519PrivateKey | None = None,
    int8: bool = False,
    bins: int = 32,
    selftest_outputs: np.ndarray | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Write a complete bundle (model, manifest, reference.json, selftest.npz, report.md)."""
    train = digits_like_inputs(512, seed=100 + seed)
    model = cnn_model(seed)
    model_bytes = quantize_int8(model, ((train - MEAN) / STD).astype(np.float32)) if int8 else model.SerializeToString()
    plan = MonitorPlan.for_image(INPUT_SHAPE, LABELS)
    logits = run_model(model_bytes, train)
    reference = build_reference(plan, plan.values(train, logits), bins)
    selftest_in = train[:8]
    selftest_out = run_model(model_bytes, selftest_in) if selftest_outputs is None else selftest_outputs
    buf = io.BytesIO()
    np.savez(buf, inputs=selftest_in, outputs=selftest_out)
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "model": {
            "precision": "int8" if int8 else "fp32",
            "inputs": [{"name": "input", "shape": ["batch", *INPUT_SHAPE], "dtype": "float32"}],
            "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}],
            "output_kind": "logits",
            "preprocessing": {"mean": MEAN, "std": STD},
        },
        "labels": LABELS,
        "monitoring": plan.to_manifest(),
        **(extra_manifest or {}),
    }
    members = {
        "model.onnx": model_bytes,
        REFERENCE: canonical_json(reference.to_json()),
        SELFTEST: buf.getvalue(),
        REPORT: b"# test bundle\n",
    }
    return write_bundle(out_dir, manifest, members, signing_key=signing_key)
