"""Calibration set selection: seeded, training split only, sorted, hashed."""

from __future__ import annotations

import pytest

from calibration import CalibrationError, select_calibration
from calibration.selection import ids_sha256


def test_same_seed_same_ids_and_hash_different_seed_differs() -> None:
    ids = [f"row{i}" for i in range(1000)]
    a = select_calibration(ids, 100, seed=7)
    b = select_calibration(ids, 100, seed=7)
    c = select_calibration(ids, 100, seed=8)
    assert a.ids == b.ids and a.ids_sha256 == b.ids_sha256
    assert a.ids != c.ids and a.ids_sha256 != c.ids_sha256
    assert len(set(a.ids)) == 100
    assert list(a.positions) == sorted(a.positions)  # sorted, so batches do not depend on draw order
    assert all(ids[p] == i for p, i in zip(a.positions, a.ids, strict=True))
    assert a.ids_sha256 == ids_sha256(list(a.ids))
    assert a.to_manifest("minmax") == {"method": "minmax", "samples": 100, "ids_sha256": a.ids_sha256, "seed": 7}


def test_only_ids_of_the_given_split_are_used() -> None:
    train_ids = list(range(0, 200, 2))  # even rows are train; odd rows (test) must never appear
    sel = select_calibration(train_ids, 64, seed=0)
    assert all(int(i) % 2 == 0 for i in sel.ids)


def test_smaller_split_than_requested_takes_all() -> None:
    sel = select_calibration(["a", "b", "c"], 256, seed=0)
    assert sel.ids == ("a", "b", "c")


def test_empty_split_is_a_clear_error() -> None:
    with pytest.raises(CalibrationError, match="empty") as info:
        select_calibration([], 10, seed=0)
    assert info.value.exit_code == 2
