"""Which rows a bundle's reference histograms describe once the project holds field data (docs/captures.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_kit.ship.build import reference_rows
from edge_kit.train.data import Dataset, FieldInfo
from edge_kit.train.snapshot import SnapshotInfo


def _dataset(field_rows: tuple[int, int] | None) -> Dataset:
    base_train, base_test = np.zeros((6, 2), np.float32), np.zeros((3, 2), np.float32)
    x_train, x_test = base_train, base_test
    field = None
    if field_rows is not None:  # field rows come after the source's rows, marked with 1s here
        x_train = np.concatenate([base_train, np.ones((field_rows[0], 2), np.float32)])
        x_test = np.concatenate([base_test, np.ones((field_rows[1], 2), np.float32)])
        field = FieldInfo(SnapshotInfo(Path("data/field.npz"), "m" * 32, Path("data/field.npz.dvc")),
                          rows=sum(field_rows), train_rows=field_rows[0], test_rows=field_rows[1],
                          devices={"dev-1": sum(field_rows)}, label_sources={"device": sum(field_rows)})
    snapshot = SnapshotInfo(Path("data/x.npz"), "b" * 32, Path("dvc.lock"))
    return Dataset(X_train=x_train, y_train=np.zeros(len(x_train), np.int64), X_test=x_test,
                   y_test=np.zeros(len(x_test), np.int64), train_ids=np.arange(len(x_train)),
                   test_ids=np.arange(len(x_test)), input_kind="features", input_shape=(2,),
                   feature_names=["a", "b"], labels=["0"], preprocessing={}, snapshot=snapshot, field=field)


def test_base_reference_leaves_the_field_rows_out_of_both_splits() -> None:
    train, test = reference_rows(_dataset((4, 2)), "base")
    assert train.shape == (6, 2) and test.shape == (3, 2)
    assert not train.any() and not test.any()


def test_all_reference_describes_base_and_field_rows() -> None:
    train, test = reference_rows(_dataset((4, 2)), "all")
    assert train.shape == (10, 2) and test.shape == (5, 2)
    assert train[6:].all() and test[3:].all()


@pytest.mark.parametrize("which", ["base", "all"])
def test_without_field_data_both_are_the_whole_splits(which: str) -> None:
    train, test = reference_rows(_dataset(None), which)
    assert train.shape == (6, 2) and test.shape == (3, 2)
