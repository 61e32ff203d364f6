"""Datasets: sources, the seeded stored split, preprocessing fitted on the train split only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_kit.config import load_config
from edge_kit.errors import DataError
from edge_kit.train.data import FEATURES, IMAGE, apply_preprocessing, load_dataset
from tests.helpers.training import make_project


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("digits")
    return load_dataset(load_config(make_project(root, '[data]\nsource = "sklearn:digits"\n')))


def test_digits_are_images_with_raw_pixels(digits) -> None:
    assert digits.input_kind == IMAGE and digits.input_shape == (1, 8, 8)
    assert digits.X_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.X_train.shape[1:] == (1, 8, 8)
    assert digits.X_train.min() == 0.0 and digits.X_train.max() == 16.0  # raw, not preprocessed
    assert digits.labels == [str(i) for i in range(10)] and digits.feature_names == []


def test_split_is_disjoint_complete_stratified_and_stored(digits) -> None:
    train, test = set(digits.train_ids.tolist()), set(digits.test_ids.tolist())
    assert not train & test and len(train | test) == 1797
    assert len(test) == 360  # 20 % of 1797, rounded up by scikit-learn
    assert np.array_equal(np.bincount(digits.y_test, minlength=10) > 30, np.ones(10, bool))  # every class present
    stored = json.loads((digits.snapshot.path.parent.parent / ".edgekit" / "split.json").read_text())
    assert stored["test_ids"] == digits.test_ids.tolist() and stored["dvc_md5"] == digits.snapshot.dvc_md5


def test_split_is_reproducible_and_seed_dependent(tmp_path: Path, digits) -> None:
    again = load_dataset(load_config(make_project(tmp_path / "same", '[data]\nseed = 0\n')))
    other = load_dataset(load_config(make_project(tmp_path / "other", '[data]\nseed = 1\n')))
    assert np.array_equal(again.test_ids, digits.test_ids)
    assert not np.array_equal(other.test_ids, digits.test_ids)


def test_preprocessing_uses_the_train_split_only(digits) -> None:
    assert digits.preprocessing["mean"] == pytest.approx(float(digits.X_train.astype(np.float64).mean()))
    assert digits.preprocessing["std"] == pytest.approx(float(digits.X_train.astype(np.float64).std()))
    assert digits.preprocessing["mean"] != pytest.approx(float(digits.X_test.astype(np.float64).mean()), abs=1e-6)
    x = digits.preprocess(digits.X_train)
    assert x.dtype == np.float32 and abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    json.dumps(digits.preprocessing)  # travels in the bundle manifest


def test_tabular_csv_source(tmp_path: Path) -> None:
    root = tmp_path / "csv"
    rng = np.random.default_rng(0)
    rows = ["width,colour_code,kind"]
    for i in range(60):
        rows.append(f"{rng.normal():.5f},{i % 3},{'cat' if i % 2 else 'dog'}")
    root.mkdir()
    (root / "animals.csv").write_text("\n".join(rows) + "\n")
    config = make_project(root, '[data]\nsource = "csv:animals.csv"\nlabel_column = "kind"\ntest_fraction = 0.25\n')
    data = load_dataset(load_config(config))
    assert data.input_kind == FEATURES and data.input_shape == (2,)
    assert data.feature_names == ["width", "colour_code"] and data.labels == ["cat", "dog"]
    assert len(data.test_ids) == 15 and len(data.preprocessing["mean"]) == 2
    assert (root / "animals.csv.dvc").is_file()  # the user's own file is what DVC tracks


def test_csv_with_a_non_number_names_line_and_column(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "d.csv").write_text("a,label\n1.0,x\n2.0,y\nhello,x\n3.0,y\n")
    config = make_project(root, '[data]\nsource = "csv:d.csv"\nlabel_column = "label"\n')
    with pytest.raises(DataError, match=r"line 4, column 'a': 'hello' is not a number"):
        load_dataset(load_config(config))


def test_npz_source_with_string_labels(tmp_path: Path) -> None:
    root = tmp_path / "npz"
    root.mkdir()
    rng = np.random.default_rng(1)
    np.savez(root / "d.npz", X=rng.normal(size=(40, 3)), y=np.array(["b", "a"] * 20))
    data = load_dataset(load_config(make_project(root, '[data]\nsource = "npz:d.npz"\n')))
    assert data.labels == ["a", "b"] and data.feature_names == ["f0", "f1", "f2"]
    assert data.X_train.dtype == np.float32


def test_corrupt_npz_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "corrupt"
    root.mkdir()
    (root / "d.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError, match="cannot read npz data file"):
        load_dataset(load_config(make_project(root, '[data]\nsource = "npz:d.npz"\n')))


def test_apply_preprocessing_per_feature() -> None:
    out = apply_preprocessing({"mean": [1.0, 2.0], "std": [2.0, 4.0]}, np.array([[3.0, 10.0]]))
    assert out.tolist() == [[1.0, 2.0]] and out.dtype == np.float32
