"""What "keep this layer in fp32" has to exclude for the layer's output to really stay float.

In a QDQ model a tensor is quantized when its producer or any reader is quantized, and ORT's
quantizer lets a Relu/Clip/MaxPool/reshape inherit the quantization of its neighbours. So excluding
one node alone rarely helps: its output still gets a Q/DQ pair for the next layer. A fallback
unit is the layer plus everything that reads its output up to and including the next compute
layers, which is the smallest set that keeps the damaged activation in float.

A tensor unit is finer: one activation's Q/DQ pair dropped (`edge_kit.compile.float_tensors`), every
node left as quantized as it can be. It reaches what no layer unit can, such as a Concat or Add
output, and keeps the producing layer in int8.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from edge_kit.compile.float_tensors import quantized_activations
from edge_kit.compile.qdq_analysis import LAYOUT_OPS, QDQ_OPS

# Nodes that pass an activation through without doing float maths worth quantizing on their own.
PASS_THROUGH = LAYOUT_OPS | {"Relu", "Clip", "MaxPool", "Dropout"}


@dataclass(frozen=True)
class FallbackUnit:
    node: str  # the layer whose output is kept in float (a tensor unit: the tensor's producer)
    op_type: str
    members: tuple[str, ...]  # every node name to put in nodes_to_exclude
    tensors: tuple[str, ...] = ()  # activations whose Q/DQ pair is dropped (tensor units only)

    @property
    def label(self) -> str:
        return f"tensor {self.tensors[0]}" if self.tensors and not self.members else self.node


def fallback_units(model: onnx.ModelProto) -> list[FallbackUnit]:
    """One unit per compute node of a (pre-processed, fp32) model, in graph order."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    units = []
    for node in graph.node:
        if node.op_type in PASS_THROUGH or node.op_type in QDQ_OPS:
            continue
        members = [node.name]
        frontier = list(node.output)
        seen: set[str] = set()
        while frontier:
            tensor = frontier.pop()
            for reader in readers.get(tensor, []):
                if reader.name in seen:
                    continue
                seen.add(reader.name)
                members.append(reader.name)
                if reader.op_type in PASS_THROUGH:
                    frontier.extend(reader.output)
        units.append(FallbackUnit(node.name, node.op_type, tuple(dict.fromkeys(members))))
    return units


def tensor_units(qdq_model: onnx.ModelProto) -> list[FallbackUnit]:
    """One unit per quantized activation of a QDQ model (the gate's round 0), in graph order."""
    return [FallbackUnit(t.producer or t.name, t.producer_op, (), (t.name,)) for t in quantized_activations(qdq_model)]
