"""Calibration method names are defined once, and every name has a preset."""

from __future__ import annotations

import pytest

from calibration import CalibrationError
from calibration.methods import CALIBRATION_METHODS, preset_for


@pytest.mark.parametrize("name", CALIBRATION_METHODS)
def test_every_method_name_has_its_preset(name: str) -> None:
    assert preset_for(name).name == name


def test_an_unknown_method_names_the_allowed_ones() -> None:
    with pytest.raises(CalibrationError, match="minmax, entropy, percentile"):
        preset_for("kl")
