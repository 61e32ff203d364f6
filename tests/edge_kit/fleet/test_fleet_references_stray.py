"""`fleet serve --bundles DIR` with stray files in the folder: each is skipped and logged, the good
bundles are monitored, and the server starts (an encrypted zip among them included)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from edge_kit.fleet.reference_index import ReferenceStore
from harness.fleetkit import DigitsBundle
from tests.helpers.hostile_zips import bomb_beside, encrypted_zip, unsupported_method_zip


def test_stray_files_in_the_bundles_folder_are_skipped_and_logged(
        digits_bundle: DigitsBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "bundles"
    folder.mkdir()
    shutil.copy(digits_bundle.path, folder / "good.edgebundle")
    (folder / "encrypted.edgebundle").write_bytes(encrypted_zip())
    (folder / "method.edgebundle").write_bytes(unsupported_method_zip())
    (folder / "bomb.edgebundle").write_bytes(bomb_beside(digits_bundle.path, mib=300))
    with caplog.at_level(logging.WARNING, logger="edge_kit.fleet.reference_index"):
        store = ReferenceStore(folder=folder)
    assert [r.source for r in store.all()] == [str(folder / "good.edgebundle")]
    skipped = " ".join(r.getMessage() for r in caplog.records)
    for name in ("encrypted.edgebundle", "method.edgebundle", "bomb.edgebundle"):
        assert f"skipping bundle {folder / name}" in skipped
