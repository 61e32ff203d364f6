"""What a QDQ model actually runs in int8 and what stays fp32, and why: read from the graphs.

A node counts as quantized when its op type has an int8 form in ORT's quantizer and every float
input (activations and weights) arrives through a DequantizeLinear: that is the pattern ORT's QDQ
fusions turn into an int8 kernel. A Gemm whose weight is still a float initializer runs in fp32
even if its activation went through Q/DQ. Everything else with float maths stays fp32, and the
report says why: kept in fp32 on purpose (the gate's fallback), an op type ORT's quantizer has no
int8 form for, or left unquantized by the quantizer itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from calibration.ranges import quantizable_op_types

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Ops that only move or reshape data: they run the same in any precision, so not worth listing.
LAYOUT_OPS = frozenset({
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Shape", "Gather", "Concat", "Slice",
    "Identity", "Constant", "Cast", "Split", "Expand", "Clip",
})
INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)


@dataclass(frozen=True)
class Fp32Node:
    name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class QdqSummary:
    quantize_nodes: int
    dequantize_nodes: int
    int8_initializers: int
    float_initializers: int
    quantized_nodes: tuple[str, ...]
    fp32_nodes: tuple[Fp32Node, ...]
    op_counts: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "quantize_nodes": self.quantize_nodes,
            "dequantize_nodes": self.dequantize_nodes,
            "int8_initializers": self.int8_initializers,
            "float_initializers": self.float_initializers,
            "quantized_nodes": list(self.quantized_nodes),
            "fp32_nodes": [{"name": n.name, "op_type": n.op_type, "reason": n.reason} for n in self.fp32_nodes],
        }


def summarize_qdq(model: onnx.ModelProto | str | Path, excluded: tuple[str, ...] = (),
                  float_tensors: tuple[str, ...] = ()) -> QdqSummary:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    float_inits = {t.name for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    other_inits = {t.name for t in graph.initializer} - float_inits

    def via_dq(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    supported = set(quantizable_op_types())
    quantized: list[str] = []
    fp32: list[Fp32Node] = []
    for node in graph.node:
        if node.op_type in QDQ_OPS or node.op_type in LAYOUT_OPS:
            continue
        # Non-float initializers (shapes, axes) and Constant outputs do not take part.
        data_inputs = [
            n for n in node.input
            if n and n not in other_inits and not (n in producer and producer[n].op_type == "Constant")
        ]
        if node.op_type in supported and data_inputs and all(via_dq(n) for n in data_inputs):
            quantized.append(node.name)
        elif node.name in excluded:
            fp32.append(Fp32Node(node.name, node.op_type, "kept in fp32 by the accuracy gate's fallback"))
        elif node.op_type not in supported:
            fp32.append(Fp32Node(node.name, node.op_type, "no int8 form in ONNX Runtime's quantizer"))
        elif kept := [n for n in data_inputs if n in float_tensors]:
            fp32.append(Fp32Node(node.name, node.op_type, f"reads {', '.join(kept)}, kept float by the accuracy "
                                 "gate's fallback"))
        else:
            plain = [n for n in data_inputs if not via_dq(n)]
            fp32.append(Fp32Node(node.name, node.op_type,
                                 f"float input(s) not from DequantizeLinear: {', '.join(plain) or 'none'}"))
    ops = Counter(n.op_type for n in graph.node)
    int8 = sum(1 for t in graph.initializer if t.data_type in INT8_TYPES)
    floats = sum(1 for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))
    return QdqSummary(
        ops.get("QuantizeLinear", 0), ops.get("DequantizeLinear", 0), int8, floats,
        tuple(quantized), tuple(fp32), dict(sorted(ops.items())),
    )
