"""Run the calibration once, check every range, and keep it in ORT's calibration cache format.

The cache lets the quantizer (and each fallback round of the accuracy gate) reuse the ranges
instead of running the calibration data through the model again. A method that raises, or a
tensor whose range comes out NaN/inf, is reported by method and tensor name: a broken range would
otherwise become a NaN scale that turns every output of the int8 model into garbage.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, load_tensors_data, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from calibration.errors import CalibrationError
from calibration.methods import CalibrationPreset


def quantizable_op_types() -> list[str]:
    """The op types ORT's static quantizer knows (what it calibrates by default), sorted for stability."""
    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


@dataclass(frozen=True)
class CalibrationRanges:
    cache_path: Path
    preset: CalibrationPreset
    tensors: dict[str, tuple[float, float]]  # tensor name -> (lowest, highest)


def compute_ranges(
    model_path: str | Path, reader: CalibrationDataReader, preset: CalibrationPreset, cache_path: str | Path
) -> CalibrationRanges:
    """Calibrate `model_path` on `reader` with `preset`; write the ranges to `cache_path` and return them."""
    cache = Path(cache_path)
    with tempfile.TemporaryDirectory(prefix="edgekit-calib-") as tmp:
        try:
            calibrator = create_calibrator(
                Path(model_path),
                quantizable_op_types(),
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=preset.method,
                extra_options=dict(preset.options),
            )
            calibrator.collect_data(reader)
            tensors = calibrator.compute_data()
        except CalibrationError:
            raise
        except Exception as exc:
            raise CalibrationError(
                f"calibration method '{preset.name}' failed: {type(exc).__name__}: {exc}",
                hint="pick another quantize.calibration method; edge-kit never swaps methods silently",
            ) from exc
        finally:
            reader.rewind()
    if not isinstance(tensors, TensorsData) or not tensors.data:
        raise CalibrationError(f"calibration method '{preset.name}' produced no ranges")
    ranges = _checked(tensors, preset.name)
    save_tensors_data(tensors, cache)
    return CalibrationRanges(cache, preset, ranges)


def load_ranges(cache_path: str | Path, preset: CalibrationPreset) -> CalibrationRanges:
    tensors = load_tensors_data(Path(cache_path))
    return CalibrationRanges(Path(cache_path), preset, _checked(tensors, preset.name))


def _checked(tensors: TensorsData, method: str) -> dict[str, tuple[float, float]]:
    ranges: dict[str, tuple[float, float]] = {}
    bad: list[str] = []
    for name in sorted(tensors.keys()):
        data = tensors[name]
        low = np.asarray(data.range_value[0], dtype=np.float64)
        high = np.asarray(data.range_value[1], dtype=np.float64)
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            bad.append(name)
            continue
        ranges[name] = (float(low.min()), float(high.max()))
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CalibrationError(
            f"calibration method '{method}' gave non-finite ranges for tensor(s): {shown}",
            hint="try another quantize.calibration method, or check the model for overflow on the calibration data",
        )
    return ranges
