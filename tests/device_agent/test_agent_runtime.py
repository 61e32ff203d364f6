"""ONNX Runtime model: same preprocessing as the build, clear refusals for bad inputs, self-test."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from device_agent.agent import load_model
from device_agent.bundle.format import SELFTEST
from device_agent.errors import InputError, VerificationError
from harness.bundles import MEAN, STD, digits_like_inputs, make_bundle, run_model


def test_outputs_match_the_model_run_with_the_build_preprocessing(bundle_v1: Path) -> None:
    loaded = load_model(bundle_v1)
    x = digits_like_inputs(20, seed=5)
    expected = run_model(_model_bytes(bundle_v1), x)
    np.testing.assert_allclose(loaded.runtime.run(loaded.runtime.as_batch(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded.runtime.preprocess(x), (x - MEAN) / STD, rtol=1e-6)
    assert loaded.selftest["ran"] and loaded.selftest["max_abs_diff"] < 1e-4


def _model_bytes(bundle: Path) -> bytes:
    with zipfile.ZipFile(bundle) as zf:
        return zf.read("model.onnx")


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 1, 8, 8), (3, 64), (64,)])
def test_accepted_input_layouts(bundle_v1: Path, shape: tuple[int, ...]) -> None:
    runtime = load_model(bundle_v1).runtime
    x = np.ones(shape, dtype=np.int64)  # integers are converted
    batch = runtime.as_batch(x)
    assert batch.dtype == np.float32 and batch.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.ones((2, 8, 7)), "does not fit"),
        (np.ones((2, 65)), "does not fit"),
        (np.full((1, 8, 8), np.nan), "NaN"),
        (np.full((1, 8, 8), np.inf), "NaN or infinite"),
        (np.array([["a"] * 64]), "numeric"),
        (np.ones((1, 8, 8), dtype=bool), "booleans"),
        (np.ones((0, 1, 8, 8)), "empty"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(bundle_v1: Path, value: np.ndarray, message: str) -> None:
    runtime = load_model(bundle_v1).runtime
    with pytest.raises(InputError, match=message):
        runtime.as_batch(value)


def test_int8_bundle_loads_and_self_tests(tmp_path: Path) -> None:
    loaded = load_model(make_bundle(tmp_path, int8=True))
    nodes = {n.op_type for n in onnx.load_from_string(_model_bytes(loaded.path)).graph.node}
    assert "QuantizeLinear" in nodes and "DequantizeLinear" in nodes
    assert loaded.selftest["ran"]


def test_a_bundle_whose_outputs_differ_on_this_device_fails_its_self_test(tmp_path: Path) -> None:
    wrong = np.zeros((8, 10), dtype=np.float32)
    wrong[:, 3] = 5.0
    path = make_bundle(tmp_path, selftest_outputs=wrong)
    with pytest.raises(VerificationError) as err:
        load_model(path)
    assert err.value.member == SELFTEST


@pytest.mark.parametrize("samples", [1, 32, 1100])  # 1100 x 64 values: past the byte-scan size, the sum path
def test_one_non_finite_value_in_a_float32_batch_is_refused_and_huge_finite_values_are_not(
        bundle_v1: Path, samples: int) -> None:
    runtime = load_model(bundle_v1).runtime
    huge = np.full((samples, 1, 8, 8), np.finfo(np.float32).max, dtype=np.float32)  # a float32 sum would overflow
    assert runtime.as_batch(huge) is huge  # already a proper batch: checked, not copied
    for bad in (np.nan, np.inf, -np.inf):
        x = digits_like_inputs(samples, seed=3).astype(np.float32)
        x[-1, 0, 7, 7] = bad
        with pytest.raises(InputError, match="NaN or infinite"):
            runtime.as_batch(x)


@pytest.mark.parametrize("int8", [False, True])
def test_preprocessing_outside_the_graph_is_folded_in_at_load_with_identical_outputs(tmp_path: Path,
                                                                                   int8: bool) -> None:
    """A bundle that standardises outside its graph runs `(raw - mean) / std` inside the session once loaded:
    the same float32 operations, so the outputs equal the model run on numpy-standardised inputs bit for bit."""
    bundle = make_bundle(tmp_path, int8=int8)
    loaded = load_model(bundle)
    assert loaded.runtime.folded
    for n in (1, 7, 32):
        x = digits_like_inputs(n, seed=n)
        np.testing.assert_array_equal(loaded.runtime.run(loaded.runtime.as_batch(x)),
                                      run_model(_model_bytes(bundle), x))


def test_a_graph_the_fold_cannot_edit_safely_is_left_to_numpy() -> None:
    from onnx import TensorProto, helper

    from device_agent.runtime import fold_preprocessing

    mean, std = np.float32([3.0]), np.float32([2.0])
    two_inputs = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]))
    passthrough = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "echo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]))
    int_input = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "ints",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]))
    for model in (two_inputs, passthrough, int_input):
        assert fold_preprocessing(model.SerializeToString(), mean, std) is None
    assert fold_preprocessing(b"not a model at all", mean, std) is None
