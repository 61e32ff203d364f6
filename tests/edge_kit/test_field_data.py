"""Training reads the field data `data add` recorded: checked against its .dvc file, split like the source's
(stratified, seeded, stored under the field md5), added to both splits, named in the provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_kit.config import load_config
from edge_kit.errors import DataError
from edge_kit.train.data import load_dataset
from edge_kit.train.field_data import add_field_data
from edge_kit.train.provenance import collect_provenance
from tests.helpers.field_captures import digit_records, digits, write_export
from tests.helpers.projects import make_project


def test_training_data_holds_the_field_rows_in_both_splits(tmp_path: Path) -> None:
    config_path = make_project(tmp_path / "proj")
    root = config_path.parent
    base = load_dataset(load_config(config_path))
    assert base.field is None
    X, y = digits(60, offset=1200)
    write_export(tmp_path / "export", digit_records(X, y))
    added = add_field_data(config_path, tmp_path / "export")
    assert added["added"] == 60 and added["committed"]

    config = load_config(config_path)
    assert config.data.field == "data/field.npz"
    data = load_dataset(config)
    field = data.field
    assert field is not None and field.rows == 60 and field.snapshot.dvc_md5 == added["md5"]
    assert field.train_rows + field.test_rows == 60 and field.test_rows == 12  # test_fraction 0.2, like the source
    assert field.devices == {"dev-1": 30, "dev-2": 30} and field.label_sources == {"device": 60}
    n_base = len(base.train_ids) + len(base.test_ids)
    # The source's split is untouched; field rows follow it, with ids n_base.. .
    np.testing.assert_array_equal(data.train_ids[:len(base.train_ids)], base.train_ids)
    np.testing.assert_array_equal(data.test_ids[:len(base.test_ids)], base.test_ids)
    field_train = data.train_ids[len(base.train_ids):] - n_base
    field_test = data.test_ids[len(base.test_ids):] - n_base
    assert sorted([*field_train, *field_test]) == list(range(60))
    np.testing.assert_array_equal(data.X_test[len(base.test_ids):], X[field_test])
    np.testing.assert_array_equal(data.y_train[len(base.train_ids):], y[field_train])
    assert len(set(y[field_test])) >= 8  # stratified: the 12 test rows spread over the classes
    assert data.split_sha256 != base.split_sha256
    stored = json.loads((root / ".edgekit" / "field-split.json").read_text())
    assert stored["field_md5"] == added["md5"] and stored["test_ids"] == field_test.tolist()
    again = load_dataset(config)  # stored: the same split
    np.testing.assert_array_equal(again.test_ids, data.test_ids)
    assert again.split_sha256 == data.split_sha256

    provenance = collect_provenance(config, data)["data"]
    assert provenance["dvc_md5"] == base.snapshot.dvc_md5  # the source's record stays where it was
    prov_field = provenance["field"]
    assert prov_field["dvc_md5"] == added["md5"] and prov_field["dvc_file"] == "data/field.npz.dvc"
    assert prov_field["path"] == "data/field.npz" and prov_field["rows"] == 60
    captures = prov_field["captures"]
    assert captures["manifest"] == "field-manifest.json" and captures["labelled_rows"] == 60
    assert captures["devices"] == {"dev-1": 30, "dev-2": 30}
    assert next(iter(captures["model_versions"].values()))["version"] == "0.1.0"

    # More field data: a new md5, a new split record, a new split identity.
    write_export(tmp_path / "export2", digit_records(*digits(20, offset=1300), start=500))
    second = add_field_data(config_path, tmp_path / "export2")
    more = load_dataset(load_config(config_path))
    assert more.field is not None and more.field.rows == 80 and more.split_sha256 != data.split_sha256
    assert json.loads((root / ".edgekit" / "field-split.json").read_text())["field_md5"] == second["md5"]

    # A field file that no longer matches its .dvc file is refused.
    path = root / "data" / "field.npz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="does not match its DVC record"):
        load_dataset(load_config(config_path))


def test_a_missing_field_file_says_how_to_restore_it(tmp_path: Path) -> None:
    config_path = make_project(tmp_path / "proj")
    write_export(tmp_path / "export", digit_records(*digits(5)))
    add_field_data(config_path, tmp_path / "export")
    (config_path.parent / "data" / "field.npz").unlink()
    with pytest.raises(DataError, match=r"field\.npz is missing") as info:
        load_dataset(load_config(config_path))
    assert "dvc checkout" in str(info.value)
