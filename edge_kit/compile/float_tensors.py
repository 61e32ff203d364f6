"""Keep single activation tensors in float inside a QDQ model: the finest repair the gate can make.

ORT's quantizer only excludes whole nodes, and excluding a node rarely keeps its output float (the
next layer still quantizes it). Many int8 failures live in one tensor instead: a Concat whose range
is stretched by a constant channel, an Add of two differently scaled branches. Dropping that one
tensor's QuantizeLinear -> DequantizeLinear pair keeps every layer around it as it was; the readers
get the float tensor (a Gemm/MatMul reader then runs in float, the rest of the model stays int8).

A tensor is named as in the fp32 model. ORT renames a quantized graph output `Y` to
`Y_QuantizeLinear_Input` and gives `Y` to the DequantizeLinear; both spellings mean `Y` here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import helper


@dataclass(frozen=True)
class QuantizedTensor:
    """An activation with its own Q/DQ pair: its fp32 name and the node that produces it."""

    name: str
    producer: str  # node name, or "" for a graph input
    producer_op: str  # op type, or "input"
    quantize_node: str
    dequantize_nodes: tuple[str, ...]
    source: str  # the tensor the QuantizeLinear reads (differs from `name` for a graph output)


def quantized_activations(model: onnx.ModelProto) -> list[QuantizedTensor]:
    """Every activation (not weight) that passes through QuantizeLinear -> DequantizeLinear, in graph order."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    producer = {out: n for n in graph.node for out in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    found = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in initializers:
            continue
        dqs = [r for r in readers.get(q.output[0], []) if r.op_type == "DequantizeLinear"]
        if not dqs or len(dqs) != len(readers.get(q.output[0], [])):
            continue  # a Q read by something else than its DQs is not a plain pair: leave it alone
        name = next((d.output[0] for d in dqs if d.output[0] in outputs), q.input[0])
        made_by = producer.get(q.input[0])
        found.append(QuantizedTensor(name, made_by.name if made_by else "", made_by.op_type if made_by else "input",
                                     q.name, tuple(d.name for d in dqs), q.input[0]))
    return found


def keep_float(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` with the Q/DQ pairs of `tensors` removed; readers take the float tensor.

    A tensor that is already float (its readers were kept fp32 too) is left as it is; one that is
    not in the model at all raises ValueError naming it (a stale recorded choice must not silently
    build something else).
    """
    wanted = set(tensors)
    pairs = {t.name: t for t in quantized_activations(model) if t.name in wanted}
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    missing = sorted(wanted - set(pairs) - known)
    if missing:
        raise ValueError(f"tensor(s) to keep float are not in the model: {', '.join(missing)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {o.name for o in graph.output}
    dropped: set[str] = set()
    rename: dict[str, str] = {}
    identities: list[onnx.NodeProto] = []
    for pair in pairs.values():
        dropped.add(pair.quantize_node)
        dropped.update(pair.dequantize_nodes)
        for dq in (n for n in model.graph.node if n.name in pair.dequantize_nodes):
            if dq.output[0] in outputs:  # the graph output keeps its name: Identity from the float source
                identities.append(helper.make_node("Identity", [pair.source], [dq.output[0]],
                                                   name=f"{pair.name}_kept_float"))
            else:
                rename[dq.output[0]] = pair.source
    kept = [n for n in graph.node if n.name not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept + identities)
    # Scale/zero-point initializers only the dropped pairs used go too.
    used = {name for n in graph.node for name in n.input}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    return out
