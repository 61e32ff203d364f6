"""Which int8 kernels ONNX Runtime really runs: the fused ops in its optimized graph.

A QDQ model is only a promise; ORT's graph optimizer turns DequantizeLinear -> Conv/Gemm/MatMul ->
QuantizeLinear patterns into int8 kernels (QLinearConv, QGemm, ...) when the pattern matches its
rules exactly. A rewrite of the QDQ graph that breaks a pattern (for instance removing a weight's
all-zero zero point, which stops the Gemm -> QGemm fusion) silently leaves a float op and a
per-inference weight dequantization in its place. Comparing these counts before and after a
rewrite is how a post-pass proves it keeps every fusion.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

# ORT CPU kernels that compute in int8 (com.microsoft contrib ops and ONNX's own integer ops).
INT8_KERNELS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QLinearReduceMean",
    "QLinearWhere", "QAttention", "QEmbedLayerNormalization",
})


def optimized_graph(model_path: str | Path, out_path: str | Path) -> onnx.ModelProto:
    """The graph ORT's CPU provider runs after all of its optimisations (ORT_ENABLE_ALL)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(out_path)
    opts.log_severity_level = 3
    ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(out_path))


def fused_int8_ops(model_path: str | Path) -> Counter[str]:
    """How many of each int8 kernel ORT runs for this model on this host's CPU provider."""
    with tempfile.TemporaryDirectory(prefix="edgekit-opt-") as tmp:
        graph = optimized_graph(model_path, Path(tmp) / "optimized.onnx").graph
    return Counter(n.op_type for n in graph.node if n.op_type in INT8_KERNELS)


def float_compute_ops(model_path: str | Path) -> Counter[str]:
    """Float Conv/Gemm/MatMul left in ORT's optimized graph (what did not fuse to int8)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-opt-") as tmp:
        graph = optimized_graph(model_path, Path(tmp) / "optimized.onnx").graph
    return Counter(n.op_type for n in graph.node if n.op_type in ("Conv", "FusedConv", "Gemm", "MatMul",
                                                                   "FusedMatMul"))
