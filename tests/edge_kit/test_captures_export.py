"""`edge-kit fleet captures export`: paging the fleet's export route, the `.npz` shards and manifest, CSV labels.

These drive the export code with a stand-in for the route's paging (tests/helpers/field_captures.py);
the end-to-end test against a real `fleet serve` is tests/edge_kit/fleet/test_captures_export_fleet.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_kit.cli import main
from edge_kit.errors import UsageError
from edge_kit.fleet.captures_export import class_list, export_captures, parse_since, read_labels_csv
from tests.helpers.field_captures import MODEL_SHA, digit_records, digits, paging_server, record_id


def _shards(folder: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for path in sorted(folder.glob("captures-*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            out.append({k: npz[k] for k in npz.files})
    return out


def test_shards_and_manifest_follow_the_contract(tmp_path: Path) -> None:
    X, y = digits(20)
    records = digit_records(X, y, labelled=14)
    calls: list[str] = []
    manifest = export_captures(paging_server(records, calls=calls), tmp_path / "out", server="http://fleet",
                               shard_records=8, page_limit=6, devices=["dev-1", "dev-2"], since=1_700_000_000.0)
    assert len(calls) == 4 and "after=" not in calls[0] and all("after=" in c for c in calls[1:])
    assert "devices=dev-1%2Cdev-2" in calls[0] and "since=1700000000.0" in calls[0] and "labelled_only" not in calls[0]
    shards = _shards(tmp_path / "out")
    assert [len(s["X"]) for s in shards] == [8, 8, 4]
    assert [s["file"] for s in manifest["shards"]] == ["captures-00000.npz", "captures-00001.npz",
                                                       "captures-00002.npz"]
    X_all = np.concatenate([s["X"] for s in shards])
    y_all = np.concatenate([s["y"] for s in shards])
    assert X_all.dtype == np.float32 and X_all.shape == (20, 1, 8, 8)
    np.testing.assert_array_equal(X_all, X)
    assert y_all.dtype == np.int64
    np.testing.assert_array_equal(y_all, np.where(np.arange(20) < 14, y, -1))
    for s in shards:
        assert list(s["labels"]) == [str(i) for i in range(10)]
    ids = np.concatenate([s["id"] for s in shards])
    assert list(ids) == [record_id(i) for i in range(20)]
    assert list(np.concatenate([s["label_source"] for s in shards])) == ["device"] * 14 + [""] * 6
    assert list(shards[0]["request_id"][:5]) == ["req-0"] * 4 + ["req-1"]
    assert set(np.concatenate([s["model_sha256"] for s in shards])) == {MODEL_SHA}

    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["server"] == "http://fleet" and manifest["records"] == 20 and manifest["labelled"] == 14
    assert manifest["filters"] == {"devices": ["dev-1", "dev-2"], "since": 1_700_000_000.0, "labelled_only": False,
                                   "labels_csv": None}
    assert manifest["counts"]["devices"]["dev-1"] == {"records": 10, "labelled": 7, "label_sources": {"device": 7}}
    assert manifest["counts"]["label_sources"] == {"device": 14}
    assert manifest["model_versions"] == {MODEL_SHA: {"name": "tiny", "version": "0.1.0", "records": 20}}
    assert manifest["input"] == {"dtype": "float32", "shape": [1, 8, 8]}


def test_labelled_only_asks_the_server_and_a_rerun_replaces_the_folder(tmp_path: Path) -> None:
    X, y = digits(10)
    calls: list[str] = []
    out = tmp_path / "out"
    export_captures(paging_server(digit_records(X, y), calls=calls), out, shard_records=3)
    assert len(list(out.glob("captures-*.npz"))) == 4
    manifest = export_captures(paging_server(digit_records(X, y, labelled=5), calls=calls), out,
                               labelled_only=True)
    assert "labelled_only=1" in calls[-1]
    assert sorted(p.name for p in out.iterdir()) == ["captures-00000.npz", "manifest.json"]
    assert manifest["records"] == 5 == manifest["labelled"]

    # A failed export leaves the previous one whole, and no .tmp folder behind.
    def failing(path: str) -> dict[str, Any]:
        if "after=" in path:
            raise RuntimeError("connection reset")
        return paging_server(digit_records(X, y))(path)

    with pytest.raises(RuntimeError):
        export_captures(failing, out, page_limit=3)
    assert json.loads((out / "manifest.json").read_text())["records"] == 5
    assert not (tmp_path / "out.tmp").exists()


def test_csv_labels_fill_and_override(tmp_path: Path) -> None:
    X, y = digits(12)
    records = digit_records(X, y, labelled=4)  # requests req-0 (rows 0-3, labelled), req-1, req-2 unlabelled
    table = tmp_path / "labels.csv"
    table.write_text("request_id,row,label\nreq-1,0,9\nreq-0,2,7\nnope,0,1\n")
    manifest = export_captures(paging_server(records), tmp_path / "out", labels_csv=table, labelled_only=True)
    (shard,) = _shards(tmp_path / "out")
    assert list(shard["id"]) == [record_id(i) for i in (0, 1, 2, 3, 4)]
    names = [str(shard["labels"][i]) for i in shard["y"]]
    assert names == [str(y[0]), str(y[1]), "7", str(y[3]), "9"]
    assert list(shard["label_source"]) == ["device", "device", "csv", "device", "csv"]
    assert manifest["counts"]["label_sources"] == {"device": 3, "csv": 2}
    assert manifest["skipped_unlabelled"] == 7
    assert manifest["labels_csv"] == {"file": str(table), "entries": 3, "matched": 2, "unmatched": 1}

    whole = tmp_path / "whole.csv"
    whole.write_text("req-2,5\nreq-2,0,3\n")  # a request's rows get 5, except row 0 of it (record 8) which gets 3
    export_captures(paging_server(records), tmp_path / "out", labels_csv=whole)
    (shard,) = _shards(tmp_path / "out")
    names = [str(shard["labels"][i]) if i >= 0 else None for i in shard["y"]]
    assert names[8:12] == ["3", "5", "5", "5"] and names[4:8] == [None] * 4


@pytest.mark.parametrize(("text", "line", "says"), [
    ("req-1,3\nreq-2\n", 2, "1 fields"),
    ("request_id,row,label\nreq-1,x,3\n", 2, "row 'x'"),
    ("req-1,3\nreq-1,,3\n", 2, "an empty field"),
    ("req-1,3\n\nreq-1,4\n", 3, "already labelled '3'"),
    ("request_id,label\nreq-1,0,3\n", 2, "3 fields, expected 2"),
    ("request_id,klass\n", 1, "the header must be"),
    ("req-1,-1,3\n", 1, "not a whole number"),
])
def test_a_bad_csv_names_its_line(tmp_path: Path, text: str, line: int, says: str) -> None:
    table = tmp_path / "labels.csv"
    table.write_text(text)
    with pytest.raises(UsageError, match=f"line {line}: .*{says}"):
        read_labels_csv(table)


def test_since_takes_unix_or_iso() -> None:
    assert parse_since("1765000000") == 1_765_000_000.0
    assert parse_since("2025-12-06T05:46:40Z") == 1_765_000_000.0
    assert parse_since("2025-12-06T05:46:40") == 1_765_000_000.0  # no zone: UTC
    assert parse_since("2025-12-06T06:46:40+01:00") == 1_765_000_000.0
    assert parse_since(None) is None
    for bad in ("yesterday", "nan", "-5"):
        with pytest.raises(UsageError):
            parse_since(bad)


def test_class_list_is_the_bundles_or_the_sorted_union() -> None:
    digits_model = {"labels": ["0", "1", "2"]}
    assert class_list({"a": digits_model, "b": dict(digits_model)}, {"1"}) == ["0", "1", "2"]
    assert class_list({"a": digits_model, "b": {"labels": ["2", "1", "0"]}}, set()) == ["0", "1", "2"]
    assert class_list({"a": digits_model}, {"cat"}) == ["0", "1", "2", "cat"]
    assert class_list({}, {"b", "a"}) == ["a", "b"]


def test_cli_errors_have_their_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 40)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("req-1,1,2,3\n")
    base = ["fleet", "captures", "export", "--server", "http://127.0.0.1:9", "--token-file", str(token),
            "--out", str(tmp_path / "out")]
    assert main([*base, "--labels-csv", str(bad_csv)]) == 2
    assert "line 1" in capsys.readouterr().err
    assert main([*base, "--since", "soon"]) == 2
    capsys.readouterr()
    assert main(base) == 1  # nothing listens on port 9
    assert "cannot reach the fleet server" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
