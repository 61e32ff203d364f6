"""Preprocessing inside the model: same outputs on raw inputs, and the agent skips its numpy step for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from device_agent.agent import load_model
from device_agent.bundle.format import MODEL, read_bundle, write_bundle
from edge_kit.compile.preprocess_graph import embed_preprocessing
from harness.bundles import MEAN, STD, cnn_model, digits_like_inputs, make_bundle, run_model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0])


def test_embedded_preprocessing_gives_the_same_outputs_on_raw_inputs() -> None:
    model = cnn_model(0)
    embedded = embed_preprocessing(model, {"mean": MEAN, "std": STD})
    assert [n.op_type for n in embedded.graph.node[:2]] == ["Sub", "Div"]
    assert embedded.graph.input[0].name == model.graph.input[0].name  # the contract: input "input"
    raw = digits_like_inputs(16, seed=3)
    # Sub and Div are exact float32 ops in ORT as in numpy: identical inputs reach the first layer.
    np.testing.assert_array_equal(_run(embedded, raw), run_model(model.SerializeToString(), raw))


def test_per_feature_statistics_broadcast_like_numpy() -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    pre = {"mean": [1.0, 2.0, 3.0], "std": [0.5, 2.0, 4.0]}
    raw = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    expected = (raw - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    np.testing.assert_array_equal(_run(embed_preprocessing(model, pre), raw), expected)


def test_agent_feeds_raw_inputs_to_an_in_graph_bundle_and_old_bundles_still_load(tmp_path: Path) -> None:
    old = make_bundle(tmp_path / "old")
    b = read_bundle(old)
    manifest = dict(b.manifest)
    manifest["model"] = dict(manifest["model"], preprocessing={"mean": MEAN, "std": STD, "in_graph": True})
    members = {k: v for k, v in b.members.items() if k not in ("manifest.json", "manifest.sig")}
    members[MODEL] = embed_preprocessing(onnx.load_from_string(b.model_bytes), {"mean": MEAN, "std": STD}
                                         ).SerializeToString()
    new = write_bundle(tmp_path / "new", manifest, members)
    raw = digits_like_inputs(12, seed=4)
    before, after = load_model(old), load_model(new)
    assert after.runtime.preprocess(raw) is raw  # no numpy work before the session
    assert after.selftest["ran"] and before.selftest["ran"]  # the self-test runs on raw recorded inputs
    np.testing.assert_array_equal(after.runtime.run(after.runtime.as_batch(raw)),
                                  before.runtime.run(before.runtime.as_batch(raw)))
