"""Calibration method presets: how activation ranges are estimated from the calibration data.

- minmax: the observed min and max; exact for the data seen, sensitive to rare outliers.
- entropy: the range that minimises the KL divergence between the fp32 and int8 histograms.
- percentile: clips the 0.01% tails (99.99th percentile), robust to rare outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from onnxruntime.quantization import CalibrationMethod

from calibration.errors import CalibrationError

# The one definition of the method names: the project config's `quantize.calibration` choices, the
# presets below and the docs all come from this tuple (edge_kit.config imports it).
CALIBRATION_METHODS: Final = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationPreset:
    name: str
    method: CalibrationMethod
    # Passed to ORT's calibrator (create_calibrator's extra_options).
    options: dict[str, Any] = field(default_factory=dict)


def preset_for(name: str) -> CalibrationPreset:
    if name == "minmax":
        return CalibrationPreset(name, CalibrationMethod.MinMax)
    if name == "entropy":
        return CalibrationPreset(name, CalibrationMethod.Entropy, {"num_bins": 512, "num_quantized_bins": 128})
    if name == "percentile":
        return CalibrationPreset(name, CalibrationMethod.Percentile, {"num_bins": 2048, "percentile": 99.99})
    raise CalibrationError(f"unknown calibration method {name!r}", hint=f"allowed: {', '.join(CALIBRATION_METHODS)}")
