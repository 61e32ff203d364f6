"""`edge-kit keygen/build/verify/inspect/reproduce` end to end on a tiny digits project (real git, DVC,
MLflow, ONNX Runtime), plus every way a bundle can be broken."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from device_agent.bundle.format import (
    MANIFEST,
    MODEL,
    REFERENCE,
    REPORT,
    SELFTEST,
    SIGNATURE,
    read_bundle,
    write_bundle,
)
from tests.helpers import mlflow_default_uri
from tests.helpers.projects import OUTLIER_NET, git, make_project

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """One signed build of the tiny project, shared by the tests that only read it."""
    import os

    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from harness.processes import run_cli

    root = tmp_path_factory.mktemp("proj")
    config = make_project(root / "p")
    keys = root / "keys"
    assert run_cli("edge_kit", "keygen", "--out", str(keys), "--json").returncode == 0
    res = run_cli("edge_kit", "build", "--config", str(config), "--out", str(root / "dist"),
                  "--key", str(keys / "edgekit.key"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return config, keys, res.json()


def test_build_writes_a_complete_signed_bundle(built, edge_kit_cli) -> None:
    config, keys, out = built
    bundle = read_bundle(out["bundle"])
    m = bundle.manifest
    assert out["gate"]["passed"] is True and out["gate"]["drop"] <= 0.02
    assert set(bundle.members) == {MANIFEST, SIGNATURE, MODEL, REFERENCE, REPORT, SELFTEST}
    assert m["model"]["precision"] == "int8" and m["model"]["inputs"][0]["name"] == "input"
    assert m["model"]["preprocessing"]["mean"] and m["labels"] == [str(i) for i in range(10)]
    prov = m["provenance"]
    assert prov["git"] == {"commit": git(config.parent, "rev-parse", "HEAD"), "dirty": False}
    assert prov["mlflow"]["run_id"] == out["run_id"]
    assert prov["data"]["dvc_md5"] and prov["environment"]["lock_sha256"]
    assert prov["calibration"]["samples"] == 128 and len(prov["calibration"]["ids_sha256"]) == 64
    assert m["quantization"]["backend"] == "ort" and m["quantization"]["format"] == "QDQ"
    # The int8 model really is QDQ with int8 weights.
    model = onnx.load_from_string(bundle.model_bytes)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer) >= 3
    # Reference histograms: one per monitored channel; inputs counted over the whole training split,
    # outputs over the held-out split (a model is over-confident on its own training data).
    ref = json.loads(bundle.members[REFERENCE])["channels"]
    assert sorted(ref) == sorted(m["monitoring"]["channels"])  # canonical JSON sorts the keys
    n_train, n_test = 1437, 360  # digits, test_fraction 0.2
    assert ref["in.mean"]["n"] == sum(ref["in.mean"]["counts"]) == n_train
    assert ref["out.pred"]["n"] == sum(ref["out.pred"]["counts"]) == n_test
    assert ref["out.confidence"]["n"] == n_test
    # Self-test: the recorded outputs are what the bundled model computes for the recorded raw inputs.
    with np.load(io.BytesIO(bundle.members[SELFTEST])) as st:
        inputs, outputs = st["inputs"], st["outputs"]
    # Preprocessing is inside the model (its first nodes): raw inputs go straight to the session.
    assert m["model"]["preprocessing"]["in_graph"] is True
    model = onnx.load_from_string(bundle.model_bytes)
    assert [n.op_type for n in model.graph.node[:2]] == ["Sub", "Div"]
    sess = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": inputs.astype(np.float32)})[0], outputs, atol=1e-5)
    assert "**Accuracy gate: PASSED**" in bundle.members[REPORT].decode()

    ok = edge_kit_cli("verify", out["bundle"], "--pubkey", str(keys / "edgekit.pub"), "--json")
    assert ok.returncode == 0 and ok.json()["ok"] is True and ok.json()["signed_by"]


def test_bundle_and_report_are_in_mlflow_and_the_model_is_registered(built) -> None:
    from mlflow.tracking import MlflowClient

    _, _, out = built
    uri = read_bundle(out["bundle"]).manifest["provenance"]["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    files = {f.path for f in client.list_artifacts(out["run_id"], "bundle")}
    assert {"bundle/tiny-0.1.0.edgebundle", "bundle/report.md"} <= files
    version = client.get_model_version("tiny", out["registered_model"]["version"])
    assert version.run_id == out["run_id"]
    assert version.tags["gate.passed"] == "true"
    assert float(version.tags["gate.int8"]) == pytest.approx(out["gate"]["int8"], abs=1e-6)
    # The version is the bundle's int8 model in MLflow's ONNX flavor, and the passing build is the candidate.
    import mlflow.onnx

    assert version.source == f"runs:/{out['run_id']}/int8_model"
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == str(version.version)
    with mlflow_default_uri(uri):
        loaded = mlflow.onnx.load_model(f"models:/tiny/{version.version}")
    assert loaded.SerializeToString() == read_bundle(out["bundle"]).model_bytes


def _rewrite(src: Path, dst: Path, member: str, mutate) -> Path:
    with zipfile.ZipFile(src) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    entries[member] = mutate(entries[member])
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return dst


def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


@pytest.mark.parametrize("member", [MODEL, REFERENCE, REPORT, SELFTEST, MANIFEST, SIGNATURE])
def test_a_flipped_byte_in_any_member_fails_verify_with_exit_4(built, edge_kit_cli, tmp_path, member) -> None:
    _, keys, out = built
    bad = _rewrite(Path(out["bundle"]), tmp_path / "bad.edgebundle", member, _flip)
    res = edge_kit_cli("verify", str(bad), "--pubkey", str(keys / "edgekit.pub"), "--json")
    assert res.returncode == 4, res.stderr
    # A changed manifest (or signature) is caught by the signature; any other member by its hash.
    expected = SIGNATURE if member in (MANIFEST, SIGNATURE) else member
    assert res.json()["member"] == expected
    assert expected in res.stderr and "Traceback" not in res.stderr


def test_truncated_wrong_key_and_unsigned_bundles_fail_with_exit_4(built, edge_kit_cli, tmp_path) -> None:
    _, keys, out = built
    data = Path(out["bundle"]).read_bytes()
    (tmp_path / "cut.edgebundle").write_bytes(data[: len(data) // 2])
    res = edge_kit_cli("verify", str(tmp_path / "cut.edgebundle"))
    assert res.returncode == 4 and "truncated or corrupt" in res.stderr

    other = tmp_path / "other"
    assert edge_kit_cli("keygen", "--out", str(other)).returncode == 0
    res = edge_kit_cli("verify", out["bundle"], "--pubkey", str(other / "edgekit.pub"), "--json")
    assert res.returncode == 4 and res.json()["member"] == SIGNATURE and "wrong public key" in res.stderr

    b = read_bundle(out["bundle"])
    members = {k: v for k, v in b.members.items() if k not in (MANIFEST, SIGNATURE)}
    unsigned = write_bundle(tmp_path / "u", b.manifest, members)
    res = edge_kit_cli("verify", str(unsigned), "--pubkey", str(keys / "edgekit.pub"))
    assert res.returncode == 4 and "unsigned" in res.stderr


def test_inspect_human_and_json(built, edge_kit_cli) -> None:
    _, _, out = built
    js = edge_kit_cli("inspect", out["bundle"], "--json")
    assert js.returncode == 0
    info = js.json()
    assert info["name"] == "tiny" and info["signed"] is True
    assert info["provenance"]["mlflow"]["run_id"] == out["run_id"]
    assert info["gate"]["passed"] is True
    human = edge_kit_cli("inspect", out["bundle"])
    assert human.returncode == 0 and "gate      PASSED" in human.stdout and out["run_id"] in human.stdout


def test_build_records_the_search_and_inspect_and_report_show_every_candidate(built, edge_kit_cli) -> None:
    from device_agent.host import int8_isa

    _, _, out = built
    b = read_bundle(out["bundle"])
    q = b.manifest["quantization"]
    search = q["search"]
    assert search["objective"] == "latency" and search["batch_size"] == 1 and search["replayed"] is False
    assert search["host"]["int8_isa"] == int8_isa() and q["host"]["cpu"]
    names = [c["name"] for c in search["candidates"]]
    assert "fp32" in names and len(names) >= 4
    chosen = search["chosen"]
    assert chosen["precision"] == "int8" == b.manifest["model"]["precision"]  # allow_fp32 is off by default
    timed = [c for c in search["candidates"] if c["latency_p50_ms"] is not None]
    shipped = next(c for c in timed if c["rejected"] is None)
    assert shipped["name"] == chosen["name"] and shipped["passed"]
    assert search["chosen_figures"]["latency_p50_ms"] == shipped["latency_p50_ms"]
    assert all(c["rejected"] for c in search["candidates"] if c is not shipped)
    report = b.members[REPORT].decode()
    assert "## Candidate search" in report and all(n in report for n in names)
    human = edge_kit_cli("inspect", out["bundle"])
    assert f"search    shipped {chosen['name']!r}" in human.stdout
    assert all(f"    {n}: metric" in human.stdout for n in names)


def test_reproduce_gives_identical_bytes_and_a_diff_when_they_are_not(built, edge_kit_cli, tmp_path) -> None:
    config, _, out = built
    state = config.parent / ".edgekit"

    def listing() -> list[tuple[str, str]]:
        return sorted((str(p.relative_to(state)), hashlib.sha256(p.read_bytes()).hexdigest())
                      for p in state.rglob("*") if p.is_file())

    before = listing()
    res = edge_kit_cli("reproduce", out["bundle"], "--config", str(config), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.json()["identical"] is True
    assert res.json()["original_sha256"] == read_bundle(out["bundle"]).model_sha256
    # The rebuild retrained in a temporary directory: the project's own state is untouched.
    assert listing() == before

    # A bundle whose model differs from what the recorded inputs produce: non-zero and a diff.
    b = read_bundle(out["bundle"])
    model = onnx.load_from_string(b.model_bytes)
    scale = next(t for t in model.graph.initializer if t.name.endswith("weight_scale"))
    arr = onnx.numpy_helper.to_array(scale) * 1.01
    scale.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), scale.name))
    members = {k: v for k, v in b.members.items() if k not in (MANIFEST, SIGNATURE)}
    members[MODEL] = model.SerializeToString()
    other = write_bundle(tmp_path / "o", b.manifest, members)
    res = edge_kit_cli("reproduce", str(other), "--config", str(config), "--json")
    assert res.returncode == 4
    assert any(scale.name in line for line in res.json()["diff"])


def test_reproduce_refuses_a_changed_checkout(built, edge_kit_cli) -> None:
    config, _, out = built
    (config.parent / "notes.txt").write_text("uncommitted")
    try:
        res = edge_kit_cli("reproduce", out["bundle"], "--config", str(config))
        assert res.returncode == 2 and "uncommitted changes" in res.stderr
    finally:
        (config.parent / "notes.txt").unlink()


def test_bad_key_and_missing_signing_choice_are_usage_errors(tmp_path, edge_kit_cli) -> None:
    (tmp_path / "c.toml").write_text("[project]\nname = 'x'\n")
    res = edge_kit_cli("build", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "d"),
                       "--key", str(tmp_path / "missing.key"))
    assert res.returncode == 2 and "private key not found" in res.stderr
    res = edge_kit_cli("build", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "--key" in res.stderr
    assert not (tmp_path / "d").exists()


def test_gate_failure_exits_3_keeps_the_old_bundle_and_writes_the_report(tmp_path, edge_kit_cli) -> None:
    config = make_project(tmp_path / "p", name="spiky", factory="outlier_net:build", kwargs="{}",
                          max_drop=0.01, rounds=0, files={"outlier_net.py": OUTLIER_NET})
    dist = tmp_path / "dist"
    dist.mkdir()
    previous = dist / "spiky-0.1.0.edgebundle"
    previous.write_bytes(b"the bundle that shipped last week")
    res = edge_kit_cli("build", "--config", str(config), "--out", str(dist), "--unsigned", "--json")
    assert res.returncode == 3, res.stderr[-3000:]
    assert "accuracy gate failed" in res.stderr and "Traceback" not in res.stderr
    assert previous.read_bytes() == b"the bundle that shipped last week"
    assert sorted(p.name for p in dist.iterdir()) == ["spiky-0.1.0.edgebundle", "spiky-0.1.0.report.md"]
    report = (dist / "spiky-0.1.0.report.md").read_text()
    assert "**Accuracy gate: FAILED**" in report and "No bundle was written" in report
    assert res.json()["report"].endswith("spiky-0.1.0.report.md")
    # The same project with fallback rounds allowed: repaired, and the report names the culprit. The spike
    # stretches the Concat output; the mask zeroes it before `mix`, so keeping that one tensor float leaves
    # every layer in int8 (keeping whole layers fp32 left ~40% of the multiply-accumulates in int8, under
    # the default coverage floor).
    config.write_text(config.read_text().replace("max_fallback_rounds = 0", "max_fallback_rounds = 4"))
    res = edge_kit_cli("build", "--config", str(config), "--out", str(dist), "--unsigned", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    gate = res.json()["gate"]
    assert gate["passed"] and gate["chosen_round"] >= 1 and not gate["rounds"][0]["passed"]
    top = gate["culprits"][0]  # a layer unit (nodes kept fp32) or a tensor unit (one activation kept float)
    bundle = read_bundle(res.json()["bundle"])
    q = bundle.manifest["quantization"]
    assert top["fp32_nodes"] or top["float_tensors"]
    assert set(top["fp32_nodes"]) <= set(q["excluded_nodes"]) and set(top["float_tensors"]) <= set(q["float_tensors"])
    shown = f"tensor `{top['float_tensors'][0]}`" if top["unit"] != top["node"] else f"`{top['node']}`"
    report = bundle.members[REPORT].decode()
    assert "## Culprit ranking" in report and f"| 1 | {shown} |" in report
    assert top["unit"] == "tensor cat" and not q["excluded_nodes"] and q["int8_coverage"] >= 0.99


def test_inc_backend_builds_the_digits_example(tmp_path, edge_kit_cli) -> None:
    config = make_project(tmp_path / "p", name="tinyinc", backend="inc")
    res = edge_kit_cli("build", "--config", str(config), "--out", str(tmp_path / "dist"), "--unsigned", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.json()
    assert out["gate"]["passed"] is True
    bundle = read_bundle(out["bundle"])
    q = bundle.manifest["quantization"]
    assert q["backend"] == "inc" and q["format"] == "QDQ"
    # Weights folded to int8 and every Conv/Gemm fed by DequantizeLinear (so ORT runs int8 kernels).
    assert q["qdq"]["int8_initializers"] >= 4
    model = onnx.load_from_string(bundle.model_bytes)
    compute = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert compute and set(compute) <= set(q["qdq"]["quantized_nodes"])
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].endswith("weight") for n in model.graph.node)
