"""The one error calibration raises: bad calibration data or a method that failed (exit 2)."""

from __future__ import annotations

from device_agent.errors import DataError


class CalibrationError(DataError):
    """Empty or non-finite calibration data, or a calibration method that failed; names the culprit."""
