"""Calibration data selection and streaming readers for int8 quantization.

Build-server side only (never imported by the device agent); may use numpy, onnxruntime and
`device_agent`, never `edge_kit`.
"""

from calibration.errors import CalibrationError
from calibration.methods import CALIBRATION_METHODS, CalibrationPreset, preset_for
from calibration.ranges import compute_ranges, load_ranges
from calibration.reader import BatchedCalibrationReader
from calibration.selection import CalibrationSelection, select_calibration

__all__ = [
    "CALIBRATION_METHODS",
    "BatchedCalibrationReader",
    "CalibrationError",
    "CalibrationPreset",
    "CalibrationSelection",
    "compute_ranges",
    "load_ranges",
    "preset_for",
    "select_calibration",
]
