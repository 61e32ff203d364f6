"""How much of a model runs in int8: the share of multiply-accumulates done by int8 layers.

Counting layers misleads both ways (a 1x1 classifier and a 3x3 conv on a large map are one layer
each), and a gate that "repairs" a model by keeping every node in fp32 still passes; the MAC share
is what decides the speed-up, so the manifest, the report and `inspect` state it and
`gate.min_int8_coverage` refuses a build under it. MACs come from the model's own graph with ONNX
shape inference (symbolic dims, such as the batch, count as 1), so it works on any QDQ model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DENSE_OPS = ("Gemm", "MatMul")  # the fully connected ones


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = shape_inference.infer_shapes(model)
    out: dict[str, tuple[int, ...]] = {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    for v in values:
        dims = v.type.tensor_type.shape.dim
        out[v.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def mac_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Multiply-accumulates per compute node (Conv, ConvTranspose, Gemm, MatMul) for one sample."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    shapes = _shapes(proto)
    # A DequantizeLinear's output has its input's shape: follow it back when inference left a gap.
    source = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}

    def shape(name: str) -> tuple[int, ...] | None:
        while name not in shapes and name in source:
            name = source[name]
        return shapes.get(name)

    macs: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        w, y = shape(node.input[1]), shape(node.output[0])
        if w is None or y is None:
            continue
        if node.op_type == "Conv":
            # Weight (M, C/groups, kh, kw): each output value takes C/groups * kh * kw products.
            macs[node.name] = int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            # Weight (C, M/groups, kh, kw): each input value scatters into M/groups * kh * kw outputs.
            x = shape(node.input[0])
            macs[node.name] = int(np.prod(x)) * int(np.prod(w[1:])) if x else 0
        else:
            a = shape(node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = (a[-2] if trans_a else a[-1]) if a else (w[0] if w else 1)
            macs[node.name] = int(np.prod(y)) * int(k)
    return macs


def int8_coverage(macs: dict[str, int], int8_nodes: Iterable[str]) -> float:
    """Share (0..1) of the multiply-accumulates done by the int8 nodes; 1.0 for a model with none at all."""
    total = sum(macs.values())
    if total == 0:
        return 1.0
    return sum(macs.get(n, 0) for n in set(int8_nodes)) / total


def model_int8_coverage(path: str | Path) -> float:
    """int8 coverage of a QDQ (or fp32: 0.0) model, reading both MACs and int8 layers from its graph."""
    from edge_kit.compile.qdq_analysis import summarize_qdq

    model = onnx.load(str(path))
    macs = mac_counts(model)
    if not macs:
        return 0.0
    return int8_coverage(macs, summarize_qdq(model).quantized_nodes)
