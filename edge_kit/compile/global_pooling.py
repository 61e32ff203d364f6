"""Rewrite a spatial mean (ReduceMean over H and W of an NCHW tensor) as GlobalAveragePool.

PyTorch's dynamo exporter writes `adaptive_avg_pool2d(x, 1)` and `x.mean((2, 3))` as ReduceMean;
the TorchScript exporter wrote GlobalAveragePool. ORT's quantizer has an int8 form for
GlobalAveragePool (QLinearGlobalAveragePool) and none for ReduceMean, so after the dynamo export the
pooling of every CNN head ran in fp32 between a DequantizeLinear and a QuantizeLinear: one int8
kernel fewer than plain ORT on the same network. The two ops compute the same mean; the rewrite is
exact in fp32 and runs before calibration, so the ranges are those of the rewritten graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _axes(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "axes":  # opset < 18
            return list(attr.ints)
    if len(node.input) > 1 and node.input[1]:
        tensor = initializers.get(node.input[1])
        return None if tensor is None else [int(a) for a in numpy_helper.to_array(tensor).ravel()]
    return None


def rewrite_global_pooling(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """(model, names of the rewritten nodes): every ReduceMean over axes {2, 3} of a 4-D tensor becomes
    GlobalAveragePool (+ Squeeze when keepdims = 0). Other ReduceMeans are left as they are."""
    if not any(n.op_type == "ReduceMean" for n in model.graph.node):
        return model, []
    inferred = shape_inference.infer_shapes(model)
    initializers = {t.name: t for t in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    rewritten: list[str] = []
    for node in out.graph.node:
        rank = _rank(inferred, node.input[0]) if node.op_type == "ReduceMean" else None
        axes = _axes(node, initializers) if rank == 4 else None
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            nodes.append(node)
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        pooled = node.output[0] if keepdims else f"{node.output[0]}_pooled"
        nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name))
        if not keepdims:
            squeeze = f"{node.name}_squeeze"
            if opset >= 13:  # axes became an input in opset 13
                out.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64),
                                                                     f"{squeeze}_axes"))
                nodes.append(helper.make_node("Squeeze", [pooled, f"{squeeze}_axes"], [node.output[0]], name=squeeze))
            else:
                nodes.append(helper.make_node("Squeeze", [pooled], [node.output[0]], name=squeeze, axes=[2, 3]))
        rewritten.append(node.name)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {name for n in out.graph.node for name in n.input}
    kept = [t for t in out.graph.initializer if t.name in used or t.name not in initializers]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out, rewritten
