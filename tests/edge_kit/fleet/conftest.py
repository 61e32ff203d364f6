from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetkit import DigitsBundle, make_bundle


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> DigitsBundle:
    return make_bundle(tmp_path_factory.mktemp("bundles"))
