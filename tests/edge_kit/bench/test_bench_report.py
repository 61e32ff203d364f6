"""The full bench over a real tiny pipeline: three engines, each in its own process."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from edge_kit.bench import BenchSettings, TorchModelSpec, run_bench
from edge_kit.bench.plan import EvalData
from edge_kit.bench.sources import plan_for_bundle
from tests.helpers.bench_fixtures import TinyPipeline, load_report

QUICK = BenchSettings(batch_sizes=(1, 16), thread_counts=(1, 2), warmup=2, latency_repeats=40, throughput_repeats=4)


@pytest.fixture(scope="module")
def full_report(tiny_pipeline: TinyPipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    plan = plan_for_bundle(
        tiny_pipeline.bundle, work, settings=QUICK,
        fp32_onnx=tiny_pipeline.fp32_onnx,
        torch_model=TorchModelSpec(checkpoint=tiny_pipeline.checkpoint, factory=tiny_pipeline.factory,
                                   import_paths=(str(tiny_pipeline.root),)),
        test_data=EvalData(tiny_pipeline.x_test, tiny_pipeline.y_test, "digits test split (fixture)"),
    )
    report = run_bench(plan, out, progress=False)
    return report, out


def test_report_has_every_engine_and_the_documented_keys(full_report: tuple[dict, Path]) -> None:
    report, out = full_report
    assert load_report(out)["engines"].keys() == report["engines"].keys() == {"int8", "fp32", "pytorch"}
    for key in ("schema", "bundle", "host", "settings", "data", "engines", "missing", "comparison", "flags",
                "mlflow", "files"):
        assert key in report, key
    assert report["host"]["int8_isa"] and report["host"]["cores"] >= 1 and "onnxruntime" in report["host"]["packages"]
    for name, e in report["engines"].items():
        for key in ("model_bytes", "peak_rss_mb", "load_seconds", "latency_ms", "throughput", "accuracy",
                    "runtime_version"):
            assert key in e, (name, key)
        assert {(t["batch"], t["threads"]) for t in e["throughput"]} == {(1, 1), (16, 1), (1, 2), (16, 2)}
    assert report["missing"] == {}
    assert set(report["comparison"]) == {"int8_vs_fp32", "int8_vs_pytorch"}


def test_latency_percentiles_are_ordered_and_within_the_spread(full_report: tuple[dict, Path]) -> None:
    report, _ = full_report
    for e in report["engines"].values():
        assert [lat["threads"] for lat in e["latency_ms"]] == [1, 2]
        for lat in e["latency_ms"]:
            assert lat["n"] == QUICK.latency_repeats
            assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        for t in e["throughput"]:
            s = t["seconds_per_batch"]
            assert s["min"] <= s["median"] <= s["max"] and s["n"] == QUICK.throughput_repeats
            assert t["items_per_s_min"] <= t["items_per_s"] <= t["items_per_s_max"]
            assert t["items_per_s"] == pytest.approx(t["batch"] / s["median"])


def test_sizes_match_the_files(full_report: tuple[dict, Path], tiny_pipeline: TinyPipeline) -> None:
    report, _ = full_report
    with zipfile.ZipFile(tiny_pipeline.bundle) as zf:
        bundled_model = zf.read("model.onnx")
    engines = report["engines"]
    assert engines["int8"]["model_bytes"] == len(bundled_model) == tiny_pipeline.int8_onnx.stat().st_size
    assert engines["fp32"]["model_bytes"] == tiny_pipeline.fp32_onnx.stat().st_size
    assert engines["pytorch"]["model_bytes"] == tiny_pipeline.checkpoint.stat().st_size
    assert report["comparison"]["int8_vs_fp32"]["size_ratio"] == pytest.approx(
        tiny_pipeline.fp32_onnx.stat().st_size / len(bundled_model))


def test_accuracy_is_measured_on_the_held_out_split(full_report: tuple[dict, Path],
                                                    tiny_pipeline: TinyPipeline) -> None:
    import onnxruntime as ort

    report, _ = full_report
    engines = report["engines"]
    session = ort.InferenceSession(str(tiny_pipeline.fp32_onnx), providers=["CPUExecutionProvider"])
    expected = float((session.run(None, {"input": tiny_pipeline.x_test})[0].argmax(1) == tiny_pipeline.y_test).mean())
    assert engines["fp32"]["accuracy"] == pytest.approx(expected)
    # fp32 ONNX and eager PyTorch are the same weights: the same predictions up to rounding.
    assert engines["pytorch"]["accuracy"] == pytest.approx(expected, abs=2 / len(tiny_pipeline.y_test))
    assert engines["fp32"]["accuracy"] > 0.85 and engines["int8"]["accuracy"] > 0.8
    assert engines["int8"]["n_test"] == len(tiny_pipeline.x_test)
    drop = report["comparison"]["int8_vs_fp32"]["accuracy_drop"]
    assert drop == pytest.approx(engines["fp32"]["accuracy"] - engines["int8"]["accuracy"])


def test_each_engine_ran_in_its_own_process_and_onnx_workers_skip_torch(full_report: tuple[dict, Path]) -> None:
    engines = full_report[0]["engines"]
    assert len({e["pid"] for e in engines.values()}) == 3
    # Importing torch alone costs well over 100 MB resident; the ONNX Runtime workers never pay it.
    assert engines["pytorch"]["peak_rss_mb"] > engines["fp32"]["peak_rss_mb"] + 50
    assert engines["pytorch"]["runtime"] == "torch" and engines["int8"]["runtime"] == "onnxruntime"


def test_markdown_and_charts_are_written(full_report: tuple[dict, Path]) -> None:
    report, out = full_report
    md = (out / "report.md").read_text()
    assert report["host"]["cpu"] in md and "p99" in md and "## Throughput" in md
    assert sorted(report["files"]["charts"]) == ["latency.png", "size_memory.png", "throughput.png"]
    for chart in report["files"]["charts"]:
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({chart})" in md
    # The int8 verdict is in the report either way; if it says slower, it is at the top, loudly.
    slower = [f for f in report["flags"] if f["code"] == "int8_slower_than_fp32"]
    if slower:
        assert md.index("WARNING") < md.index("## Host")
    assert report["mlflow"]["logged"] is False and "no MLflow run" in report["mlflow"]["reason"]
