"""Preprocessing inside the model: `(raw - mean) / std` as the graph's first two nodes.

The device then hands raw float32 inputs straight to the session: no numpy temporaries and no
second pass over the batch before inference, and the arithmetic is the build's by construction.
Sub and Div are exact IEEE float32 operations in ONNX Runtime as in numpy, so the model gives the
same outputs on raw inputs as the model without them on numpy-preprocessed inputs. The manifest
says so with `model.preprocessing.in_graph = true`; bundles without it are preprocessed by the agent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MEAN, STD = "preprocessing_mean", "preprocessing_std"


def embed_preprocessing(model: onnx.ModelProto, preprocessing: dict[str, Any]) -> onnx.ModelProto:
    """A copy of `model` whose (single) input takes raw values and standardises them first."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    raw = graph.input[0].name
    standardised = f"{raw}_standardised"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == raw:
                node.input[i] = standardised
    for value in graph.output:
        if value.name == raw:  # an identity model: keep its contract (output = model input)
            raise ValueError("the model's input is also its output; nothing to preprocess into")
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    graph.initializer.extend([numpy_helper.from_array(mean, MEAN), numpy_helper.from_array(std, STD)])
    nodes = [
        helper.make_node("Sub", [raw, MEAN], [f"{raw}_centred"], name="preprocessing_sub"),
        helper.make_node("Div", [f"{raw}_centred", STD], [standardised], name="preprocessing_div"),
    ]
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    onnx.checker.check_model(out)
    return out
