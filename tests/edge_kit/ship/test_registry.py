"""The MLflow registry through the real client (SQLite store in tmp): the registered version is an ONNX
flavor model that MLflow loads and predicts with, the bundle and report sit in the same run, and the
`candidate` / `champion` aliases move (`edge-kit promote`, for bundles signed by the build's key, against
the store the operator names, never one the bundle names)."""

from __future__ import annotations

import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent.bundle.format import read_bundle, write_bundle
from device_agent.bundle.signing import generate_keypair, load_private_key
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


def make_bundle(out: Path, seed: int, version: str, tracking_uri: str, run_id: str, key: Path | None = None) -> Path:
    model = int8_model(seed)
    manifest = {"name": "tiny", "version": version, "model": {**io_spec(model), "precision": "int8"},
                "provenance": {"mlflow": {"tracking_uri": tracking_uri, "run_id": run_id}}, "gate": GATE}
    return write_bundle(out, manifest, {"model.onnx": model.SerializeToString(), "report.md": b"# report\n"},
                        signing_key=load_private_key(key) if key else None)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """The build's key pair: (private, public)."""
    return generate_keypair(tmp_path / "keys")


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Any]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("tiny", artifact_location=str(tmp_path / "artifacts"))
    return uri, client


def build_and_register(tmp_path: Path, uri: str, client: Any, seed: int, passed: bool = True,
                       key: Path | None = None) -> tuple[Path, dict]:
    exp = client.get_experiment_by_name("tiny").experiment_id
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id)
    out = tmp_path / f"dist{seed}"
    bundle = make_bundle(out, seed, f"1.0.{seed}", uri, run_id, key)
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


NO_ENV_STORE = {"MLFLOW_TRACKING_URI": ""}  # the store must come from the command line in these tests


def test_candidate_follows_passing_builds_and_promote_moves_champion(tmp_path: Path, store, keys,
                                                                     edge_kit_cli) -> None:
    uri, client = store
    private, public = keys
    first, _ = build_and_register(tmp_path, uri, client, seed=1, key=private)
    second, reg2 = build_and_register(tmp_path, uri, client, seed=2, key=private)
    assert str(client.get_model_version_by_alias("tiny", CANDIDATE).version) == "2" == reg2["version"]
    _, failed = build_and_register(tmp_path, uri, client, seed=3, passed=False, key=private)
    assert failed["aliases"] == [] and str(client.get_model_version_by_alias("tiny", CANDIDATE).version) == "2"

    out = edge_kit_cli("promote", str(first), "--pubkey", str(public), "--tracking-uri", uri, "--json",
                       env=NO_ENV_STORE)
    assert out.returncode == 0, out.stderr
    assert out.json() | {"source": None} == {"ok": True, "name": "tiny", "version": "1", "alias": CHAMPION,
                                             "previous": None, "model_uri": f"models:/tiny@{CHAMPION}", "source": None}
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == "1"
    out = edge_kit_cli("promote", str(second), "--pubkey", str(public), "--json", env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0 and out.json()["previous"] == "1"
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias("tiny", CANDIDATE).version) == "2"


def test_promote_refuses_what_it_cannot_vouch_for(tmp_path: Path, store, keys, edge_kit_cli) -> None:
    uri, client = store
    private, public = keys
    bundle, _ = build_and_register(tmp_path, uri, client, seed=1, key=private)
    failed, _ = build_and_register(tmp_path, uri, client, seed=3, passed=False, key=private)
    store_args = ("--pubkey", str(public), "--tracking-uri", uri)
    out = edge_kit_cli("promote", str(failed), *store_args, "--json")
    assert out.returncode == 2 and "did not pass the accuracy gate" in out.json()["error"]
    stranger = make_bundle(tmp_path / "other", 7, "9.9.9", uri, "no-run", key=private)
    out = edge_kit_cli("promote", str(stranger), *store_args)
    assert out.returncode == 2 and "no version of registered model 'tiny'" in out.stderr
    tampered = tmp_path / "tampered.edgebundle"
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:-1] + bytes([data[-1] ^ 1]) if info.filename == "model.onnx" else data)
    assert edge_kit_cli("promote", str(tampered), *store_args).returncode == 4
    # An unsigned bundle of a registered, gate-passing model, and one signed by another key: exit 4.
    unsigned = make_bundle(tmp_path / "unsigned", 1, "99.0.0", uri, "any")
    out = edge_kit_cli("promote", str(unsigned), *store_args, "--json")
    assert out.returncode == 4 and "unsigned" in out.json()["error"]
    other_private, _ = generate_keypair(tmp_path / "other-keys")
    foreign = make_bundle(tmp_path / "foreign", 1, "99.0.1", uri, "any", key=other_private)
    out = edge_kit_cli("promote", str(foreign), *store_args)
    assert out.returncode == 4 and "manifest.sig" in out.stderr
    out = edge_kit_cli("promote", str(bundle), "--tracking-uri", uri)  # no key: a usage error
    assert out.returncode == 2 and "--pubkey" in out.stderr
    with pytest.raises(Exception, match=r"RESOURCE_DOES_NOT_EXIST|not found|alias"):
        client.get_model_version_by_alias("tiny", CHAMPION)  # nothing was promoted


class _Recorder(BaseHTTPRequestHandler):
    """A tracking server the bundle names: it records every request and its Authorization header."""

    seen: ClassVar[list[tuple[str, str | None]]] = []

    def _record(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def foreign_tracking_server() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


def test_promote_never_follows_a_tracking_uri_named_in_the_bundle(
        tmp_path: Path, store, keys, foreign_tracking_server, edge_kit_cli) -> None:
    uri, client = store
    private, public = keys
    bundle, _ = build_and_register(tmp_path, uri, client, seed=1, key=private)
    foreign, seen = foreign_tracking_server
    # A signed bundle whose provenance names another store: with the operator's token in the environment
    # and no store named by the operator, promote stops (exit 2) and sends nothing anywhere.
    pointing = make_bundle(tmp_path / "pointing", 1, "1.0.1", foreign, "x", key=private)
    token = {"MLFLOW_TRACKING_TOKEN": "operator-secret-token", "MLFLOW_TRACKING_URI": ""}
    out = edge_kit_cli("promote", str(pointing), "--pubkey", str(public), "--json", env=token)
    assert out.returncode == 2, out.stderr
    error = out.json()["error"]
    assert "--tracking-uri" in error and foreign in error  # says what the bundle named, does not use it
    # The operator's store is used although the bundle names the foreign one.
    out = edge_kit_cli("promote", str(pointing), "--pubkey", str(public), "--tracking-uri", uri, "--json", env=token)
    assert out.returncode == 0, out.stderr
    assert str(client.get_model_version_by_alias("tiny", CHAMPION).version) == "1"
    assert seen == []  # the foreign store never heard from promote, let alone got the token
    assert read_bundle(bundle).model_sha256 == read_bundle(pointing).model_sha256
