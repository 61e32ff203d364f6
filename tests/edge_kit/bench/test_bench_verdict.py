"""The int8-slower-than-fp32 flag, from injected figures: when it fires and which reason it gives."""

from __future__ import annotations

from typing import Any

from edge_kit.bench.report import compare
from edge_kit.bench.verdict import int8_verdict, likely_reasons, slower_settings

VNNI_HOST = {"machine": "x86_64", "int8_isa": "AVX-512 VNNI", "isa_flags": ["avx2", "avx512f", "avx512_vnni"]}
AVX2_HOST = {"machine": "x86_64", "int8_isa": "AVX2 (no VNNI)", "isa_flags": ["avx2"]}
ARM_DOT_HOST = {"machine": "aarch64", "int8_isa": "Arm dot product", "isa_flags": ["asimddp"]}
MANIFEST = {"quantization": {"format": "QDQ", "target": "x86-vnni", "excluded_nodes": []}, "gate": {"max_drop": 0.01}}


def engine(p50_ms: float, items_per_s: float, accuracy: float = 0.95, size: int = 1000) -> dict[str, Any]:
    return {
        "latency_ms": [{"threads": 1, "p50": p50_ms, "p95": p50_ms * 1.2, "p99": p50_ms * 1.5}],
        "throughput": [{"batch": 32, "threads": 1, "items_per_s": items_per_s}],
        "accuracy": accuracy,
        "model_bytes": size,
    }


def test_faster_int8_raises_no_flag() -> None:
    figures = {"int8": engine(2.0, 9000), "fp32": engine(4.0, 5000)}
    assert int8_verdict(figures, VNNI_HOST, MANIFEST) == []


def test_difference_within_noise_tolerance_is_not_flagged() -> None:
    figures = {"int8": engine(4.1, 4900), "fp32": engine(4.0, 5000)}  # 2.5% and 2% slower: noise
    assert slower_settings(figures["int8"], figures["fp32"]) == []
    assert int8_verdict(figures, VNNI_HOST, MANIFEST) == []


def test_slower_int8_is_flagged_with_every_slower_setting() -> None:
    figures = {"int8": engine(6.0, 3000), "fp32": engine(4.0, 5000)}
    [flag] = int8_verdict(figures, VNNI_HOST, MANIFEST)
    assert flag.level == "warning" and flag.code == "int8_slower_than_fp32"
    assert "SLOWER THAN FP32" in flag.message and "2 of 2" in flag.message
    assert "6.000 ms int8 vs 4.000 ms fp32" in flag.message and "3000/s int8 vs 5000/s fp32" in flag.message
    # On a VNNI host with a matching target and a normal-sized model, no structural reason applies.
    assert len(flag.reasons) == 1 and "rerun without --quick" in flag.reasons[0]


def test_missing_vnni_is_the_first_reason() -> None:
    reasons = likely_reasons(engine(6.0, 3000), engine(4.0, 5000), AVX2_HOST, MANIFEST["quantization"])
    assert "no VNNI or dot-product" in reasons[0] and "AVX2 (no VNNI)" in reasons[0]
    assert any("targets x86-vnni but this CPU has no VNNI" in r for r in reasons)


def test_arm_dot_product_counts_as_int8_support() -> None:
    reasons = likely_reasons(engine(6.0, 3000), engine(4.0, 5000), ARM_DOT_HOST, {"target": "arm64"})
    assert not any("no VNNI or dot-product" in r for r in reasons)


def test_wrong_target_for_the_host_is_named() -> None:
    reasons = likely_reasons(engine(6.0, 3000), engine(4.0, 5000), VNNI_HOST, {"target": "arm64"})
    assert any("wrong format for this host" in r and "'arm64'" in r for r in reasons)
    reasons = likely_reasons(engine(6.0, 3000), engine(4.0, 5000), VNNI_HOST, {"target": "x86-avx2"})
    assert any("reduce_range" in r for r in reasons)


def test_fp32_fallback_nodes_and_tiny_models_are_reasons() -> None:
    q = {"target": "x86-vnni", "excluded_nodes": ["/conv1/Conv", "/fc/Gemm"]}
    reasons = likely_reasons(engine(0.05, 3000), engine(0.04, 5000), VNNI_HOST, q)
    assert any("kept 2 node(s)/tensor(s) in float" in r and "/conv1/Conv" in r for r in reasons)
    assert any("the model is tiny" in r for r in reasons)


def test_accuracy_drop_beyond_the_gate_budget_is_flagged() -> None:
    figures = {"int8": engine(2.0, 9000, accuracy=0.90), "fp32": engine(4.0, 5000, accuracy=0.95)}
    [flag] = int8_verdict(figures, VNNI_HOST, MANIFEST)
    assert flag.code == "accuracy_drop_over_budget" and "0.0500" in flag.message
    figures["int8"]["accuracy"] = 0.945
    assert int8_verdict(figures, VNNI_HOST, MANIFEST) == []


def test_no_fp32_figures_means_no_verdict() -> None:
    assert int8_verdict({"int8": engine(6.0, 3000)}, AVX2_HOST, MANIFEST) == []


def test_comparison_speedups_size_ratio_and_drop() -> None:
    c = compare({"int8": engine(2.0, 9000, 0.94, 250), "fp32": engine(4.0, 4500, 0.95, 1000)})["int8_vs_fp32"]
    assert c["latency_p50_speedup"] == {"1": 2.0}
    assert c["throughput_speedup"] == {"batch=32,threads=1": 2.0}
    assert c["size_ratio"] == 4.0
    assert abs(c["accuracy_drop"] - 0.01) < 1e-12
