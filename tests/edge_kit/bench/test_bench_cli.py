"""`edge-kit bench` as a user runs it: the bundle alone, bad input, and the exit codes docs/architecture.md lists."""

from __future__ import annotations

import zipfile
from pathlib import Path

from tests.helpers.bench_fixtures import TinyPipeline, load_report


def test_bundle_alone_measures_int8_on_synthetic_inputs(edge_kit_cli, tiny_pipeline: TinyPipeline,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = edge_kit_cli("bench", str(tiny_pipeline.bundle), "--out", str(out), "--quick", "--json")
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert doc.pop("ok") is True  # the CLI runner's success marker, beside the report's own fields
    assert doc == load_report(out)
    assert list(doc["engines"]) == ["int8"]
    int8 = doc["engines"]["int8"]
    assert int8["accuracy"] is None and "synthetic" in doc["data"]["source"]
    with zipfile.ZipFile(tiny_pipeline.bundle) as zf:
        assert int8["model_bytes"] == len(zf.read("model.onnx"))
    assert int8["model_file"].endswith("tiny-0.0.1.edgebundle:model.onnx")
    # What could not be measured is said, not hidden.
    assert set(doc["missing"]) == {"fp32", "pytorch"}
    assert "fp32 not measured" in result.stderr
    md = (out / "report.md").read_text()
    assert "not measured" in md and "accuracy not measured" in md


def test_missing_bundle_is_a_usage_error(edge_kit_cli, tmp_path: Path) -> None:
    result = edge_kit_cli("bench", str(tmp_path / "nope.edgebundle"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "bundle not found" in result.stderr and "Traceback" not in result.stderr


def test_tampered_bundle_fails_verification_and_writes_nothing(edge_kit_cli, tiny_pipeline: TinyPipeline,
                                                               tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.edgebundle"
    with zipfile.ZipFile(tiny_pipeline.bundle) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.writestr(info, data)
    out = tmp_path / "o"
    result = edge_kit_cli("bench", str(tampered), "--out", str(out), "--quick")
    assert result.returncode == 4
    assert "model.onnx" in result.stderr and "sha256" in result.stderr
    assert not (out / "report.json").exists()


def test_out_that_is_a_file_is_refused_and_kept(edge_kit_cli, tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    result = edge_kit_cli("bench", str(tiny_pipeline.bundle), "--out", str(existing), "--quick")
    assert result.returncode == 2 and "not a folder" in result.stderr
    assert existing.read_text() == "keep me"


def test_an_int8_model_that_cannot_run_fails_clearly(edge_kit_cli, tiny_pipeline: TinyPipeline,
                                                     tmp_path: Path) -> None:
    from device_agent.bundle.format import read_bundle, write_bundle

    b = read_bundle(tiny_pipeline.bundle)
    # It passes verification (the hashes match what was written) but is not an ONNX model.
    garbage = write_bundle(tmp_path / "dist", b.manifest, {"model.onnx": b"not an onnx model"})
    result = edge_kit_cli("bench", str(garbage), "--out", str(tmp_path / "o"), "--quick")
    assert result.returncode == 1
    assert "engine int8" in result.stderr and "could not be measured" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_fp32_model_that_cannot_run_is_reported_and_the_rest_measured(tiny_pipeline: TinyPipeline,
                                                                        tmp_path: Path) -> None:
    from edge_kit.bench import BenchSettings, run_bench
    from edge_kit.bench.sources import plan_for_bundle

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"truncated")
    settings = BenchSettings(batch_sizes=(1,), thread_counts=(1,), warmup=1, latency_repeats=5, throughput_repeats=2)
    plan = plan_for_bundle(tiny_pipeline.bundle, tmp_path, settings=settings, fp32_onnx=broken)
    report = run_bench(plan, tmp_path / "o", progress=False)
    assert list(report["engines"]) == ["int8"]
    assert "engine fp32 (broken.onnx) could not be measured" in report["missing"]["fp32"]
    assert "fp32" in (tmp_path / "o" / "report.md").read_text()
