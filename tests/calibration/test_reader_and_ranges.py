"""Streaming reader and range computation: batches, NaN refusal, every preset, failures by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration import BatchedCalibrationReader, CalibrationError, compute_ranges, preset_for
from calibration.methods import CalibrationPreset


def test_reader_streams_preprocessed_batches_and_rewinds() -> None:
    raw = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    seen: list[int] = []

    def preprocess(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return x * 2

    reader = BatchedCalibrationReader(raw, "input", batch_size=4, preprocess=preprocess)
    batches = []
    while (b := reader.get_next()) is not None:
        batches.append(b["input"])
    assert [len(b) for b in batches] == [4, 4, 2]
    assert seen == [4, 4, 2]  # preprocessing happens per batch, never on the whole set at once
    np.testing.assert_array_equal(np.concatenate(batches), raw * 2)
    assert len(reader) == 3
    reader.rewind()
    first = reader.get_next()
    assert first is not None
    np.testing.assert_array_equal(first["input"], raw[:4] * 2)


def test_reader_refuses_nan_and_names_the_sample() -> None:
    raw = np.ones((6, 4), dtype=np.float32)
    raw[4, 2] = np.nan
    reader = BatchedCalibrationReader(raw, "input", batch_size=4, ids=tuple(f"id{i}" for i in range(6)))
    assert reader.get_next() is not None
    with pytest.raises(CalibrationError, match="id4"):
        reader.get_next()


def test_reader_refuses_empty_set() -> None:
    with pytest.raises(CalibrationError, match="empty"):
        BatchedCalibrationReader(np.zeros((0, 4), dtype=np.float32), "input")


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_preset_gives_finite_ranges_and_a_cache(linear_model: Path, tmp_path: Path, method: str) -> None:
    raw = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    reader = BatchedCalibrationReader(raw, "input", batch_size=16)
    ranges = compute_ranges(linear_model, reader, preset_for(method), tmp_path / "cache.json")
    assert {"input", "h", "logits"} <= set(ranges.tensors)
    for low, high in ranges.tensors.values():
        assert np.isfinite(low) and np.isfinite(high) and low <= high
    assert ranges.cache_path.is_file()
    if method == "minmax":
        assert ranges.tensors["input"] == pytest.approx((float(raw.min()), float(raw.max())), rel=1e-6)
    else:  # histogram methods clip outliers: never wider than the observed range
        assert ranges.tensors["input"][1] <= float(raw.max()) + 1e-5


def test_a_failing_method_is_reported_by_name(linear_model: Path, tmp_path: Path) -> None:
    raw = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    bad = CalibrationPreset("percentile", preset_for("percentile").method, {"percentile": 250.0})
    with pytest.raises(CalibrationError, match="'percentile' failed"):
        compute_ranges(linear_model, BatchedCalibrationReader(raw, "input"), bad, tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_non_finite_ranges_are_reported_by_tensor(linear_model: Path, tmp_path: Path) -> None:
    # Values that overflow float32 inside the Gemm give an inf range for 'h' (and 'logits').
    raw = np.full((4, 4), 3e38, dtype=np.float32)
    with pytest.raises(CalibrationError, match=r"non-finite ranges for tensor\(s\):.*\bh\b"):
        compute_ranges(linear_model, BatchedCalibrationReader(raw, "input"), preset_for("minmax"),
                       tmp_path / "c.json")


def test_unknown_method_is_a_usage_error() -> None:
    with pytest.raises(CalibrationError, match="allowed: minmax, entropy, percentile"):
        preset_for("kl")
