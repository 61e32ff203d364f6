"""The MLflow registry through the real client (SQLite store in tmp): the registered version is an ONNX
flavor model that MLflow loads and predicts with, the bundle and report sit in the same run, and the
`candidate` / `champion` aliases move (`edge-kit promote`)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent.bundle.format import read_bundle, write_bundle
from edge_kit.ship.package import io_spec
from edge_kit.ship.registry import CANDIDATE, CHAMPION, MODEL_ARTIFACTS, log_and_register
from tests.helpers import mlflow_default_uri

pytestmark = pytest.mark.slow  # MLflow's import and store creation take seconds

GATE = {"metric": "accuracy", "fp32": 0.95, "int8": 0.94, "drop": 0.01, "max_drop": 0.02, "passed": True, "rounds": []}
QUANT = {"backend": "ort", "target": "x86-avx2", "excluded_nodes": []}


def int8_model(seed: int) -> onnx.ModelProto:
    """A QDQ int8 linear layer, (batch, 64) -> (batch, 32) logits; its 2 KB weight is above the size at
    which ONNX would move a tensor to an external data file (MLflow's default), which must not happen."""
    w = np.random.default_rng(seed).integers(-100, 100, size=(64, 32)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["Wd"]),
             helper.make_node("MatMul", ["xd", "Wd"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def make_bundle(out: Path, seed: int, version: str, tracking_uri: str, run_id: str) -> Path:
    model = int8_model(seed)
    manifest = {"name": "tiny", "version": version, "model": {**io_spec(model), "precision": "int8"},
                "provenance": {"mlflow": {"tracking_uri": tracking_uri, "run_id": run_id}}, "gate": GATE}
    return write_bundle(out, manifest, {"model.onnx": model.SerializeToString(), "report.md": b"# report\n"})


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Any]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("tiny", artifact_location=str(tmp_path / "artifacts"))
    return uri, client


def build_and_register(tmp_path: Path, uri: str, client: Any, seed: int, passed: bool = True) -> tuple[Path, dict]:
    exp = client.get_experiment_by_name("tiny").experiment_id
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id)
    out = tmp_path / f"dist{seed}"
    bundle = make_bundle(out, seed, f"1.0.{seed}", uri, run_id)
    registered = log_and_register(uri, run_id, "tiny", bundle, "# report\n", GATE | {"passed": passed}, QUANT,
                                  read_bundle(bundle).model_sha256)
    return bundle, registered


def test_registered_version_is_an_onnx_model_mlflow_loads_and_predicts_with(tmp_path: Path, store) -> None:
    import mlflow
    import mlflow.onnx
    import mlflow.pyfunc

    uri, client = store
    bundle, reg = build_and_register(tmp_path, uri, client, seed=1)
    assert reg["version"] == "1" and reg["aliases"] == [CANDIDATE]
    version = client.get_model_version("tiny", "1")
    assert version.source == f"runs:/{version.run_id}/{MODEL_ARTIFACTS}"
    assert version.tags["gate.passed"] == "true" and version.tags["bundle.file"] == bundle.name
    files = {f.path for f in client.list_artifacts(version.run_id, "bundle")}
    assert files == {f"bundle/{bundle.name}", "bundle/report.md"}  # the bundle and report of the same run

    with mlflow_default_uri(uri):
        x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
        expected = ort.InferenceSession(read_bundle(bundle).model_bytes).run(None, {"input": x})[0]
        loaded = mlflow.onnx.load_model("models:/tiny/1")
        assert loaded.SerializeToString() == read_bundle(bundle).model_bytes  # exactly the model that ships
        assert {n.op_type for n in loaded.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
        pyfunc = mlflow.pyfunc.load_model(f"models:/tiny@{CANDIDATE}")
        signature = pyfunc.metadata.signature
        assert signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 64)},
                                               "name": "input"}]
        assert signature.outputs.input_names() == ["logits"]
        np.testing.assert_array_equal(pyfunc.predict(x)["logits"], expected)


def test_candidate_follows_passing_builds_and_promote_moves_champion(tmp_path: Path, store, edge_kit_cli) -> None:
    uri, client = store
    first, _ = build_and_register(tmp_path, uri, client, seed=1)
    second, reg2 = build_and_register(tmp_path, uri, client, seed=2)
    assert str(client.get_model_version_by_alias("tiny", CANDIDATE).version) == "2" == reg2["version"]
    _, failed = build_and_register(tmp_path, uri, client, seed=3, passed=False)
    assert failed["aliases"] == [] and str(client.get_model_version_by_alias("tiny", CANDIDATE).version) == "2"

    # The tracking URI comes from the bundle's provenance when not given.
    out = edge_kit_cli("promote", str(first), "--json")
    assert out.returncode == 0, out.stderr
    assert out.json() | {"source": None} == {"ok": True, "name": "tiny", "version": "1", "alias": CHAMPION,
                                             "previous": None, "model_uri": f"models:/tiny@{CHAMPION}", "source": None}
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == "1"
    out = edge_kit_cli("promote", str(second), "--tracking-uri", uri, "--json")
    assert out.returncode == 0 and out.json()["previous"] == "1"
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias("tiny", CANDIDATE).version) == "2"


def test_promote_refuses_what_it_cannot_vouch_for(tmp_path: Path, store, edge_kit_cli) -> None:
    uri, client = store
    bundle, _ = build_and_register(tmp_path, uri, client, seed=1)
    failed, _ = build_and_register(tmp_path, uri, client, seed=3, passed=False)
    out = edge_kit_cli("promote", str(failed), "--json")
    assert out.returncode == 2 and "did not pass the accuracy gate" in out.json()["error"]
    stranger = make_bundle(tmp_path / "other", 7, "9.9.9", uri, "no-run")
    out = edge_kit_cli("promote", str(stranger))
    assert out.returncode == 2 and "no version of registered model 'tiny'" in out.stderr
    tampered = tmp_path / "tampered.edgebundle"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-1] + bytes([data[-1] ^ 1]) if info.filename == "model.onnx" else data)
    assert edge_kit_cli("promote", str(tampered)).returncode == 4
    with pytest.raises(Exception, match=r"RESOURCE_DOES_NOT_EXIST|not found|alias"):
        client.get_model_version_by_alias("tiny", CHAMPION)  # nothing was promoted
