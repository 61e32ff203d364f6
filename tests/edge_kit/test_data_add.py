"""`edge-kit data add`: an export's labelled captures become the project's DVC-tracked field data, committed.

Real git repositories and real DVC (`dvc add`, its .dvc file), a tiny digits project; the exports are
written by the real export code from records shaped as the fleet's export route gives them.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_kit.cli import main
from edge_kit.train.field_data import set_toml_key
from edge_kit.train.snapshot import file_md5, recorded_md5
from tests.helpers import training
from tests.helpers.field_captures import capture_record, digit_records, digits, write_export
from tests.helpers.projects import git, make_project


def _add(capsys: pytest.CaptureFixture[str], export: Path, config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["data", "add", str(export), "--config", str(config), "--json", *extra])
    out = capsys.readouterr().out.strip()
    return code, (json.loads(out.splitlines()[-1]) if code == 0 else {})


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def test_data_add_records_commits_and_skips_what_is_there(project: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = project.parent
    X, y = digits(40, offset=1000)
    write_export(tmp_path / "export", digit_records(X, y, labelled=30))
    head = git(root, "rev-parse", "HEAD")

    code, result = _add(capsys, tmp_path / "export", project)
    assert code == 0
    field = root / "data" / "field.npz"
    dvc_file = root / "data" / "field.npz.dvc"
    assert result["added"] == 30 and result["skipped_unlabelled"] == 10 and result["skipped_duplicates"] == 0
    assert result["md5"] == file_md5(field) == recorded_md5(dvc_file)
    assert result["devices"] == {"dev-1": 15, "dev-2": 15} and result["label_sources"] == {"device": 30}
    assert result["committed"] and result["commit"] != head
    assert tomllib.loads(project.read_text())["data"]["field"] == "data/field.npz"
    with np.load(field) as npz:
        assert npz["X"].shape == (30, 1, 8, 8) and npz["X"].dtype == np.float32
        np.testing.assert_array_equal(npz["X"], X[:30])
        np.testing.assert_array_equal(npz["y"], y[:30])
        assert list(npz["labels"]) == [str(i) for i in range(10)]
    manifest = json.loads((root / "data" / "field-manifest.json").read_text())
    (entry,) = manifest["entries"]
    assert entry["md5"] == result["md5"] and entry["previous_md5"] is None
    assert entry["added"] == 30 and entry["rows"] == 30 and entry["skipped_unlabelled"] == 10
    assert entry["export_counts"]["devices"]["dev-1"] == {"records": 20, "labelled": 15,
                                                         "label_sources": {"device": 15}}
    assert entry["export_counts"]["label_sources"] == {"device": 30}
    assert next(iter(entry["model_versions"].values()))["version"] == "0.1.0"
    # What the commit holds: config, .dvc file, manifest, DVC's .gitignore; the data itself stays out of git.
    committed = set(git(root, "show", "--name-only", "--format=", "HEAD").splitlines())
    assert committed == {"edgekit.toml", "data/field.npz.dvc", "data/field-manifest.json", "data/.gitignore"}
    assert "30 labelled captured rows added" in git(root, "log", "-1", "--format=%s")
    assert git(root, "status", "--porcelain") == ""

    # The same export again adds nothing and commits nothing.
    code, again = _add(capsys, tmp_path / "export", project)
    assert code == 0 and again["added"] == 0 and again["skipped_duplicates"] == 30 and not again["committed"]
    assert git(root, "rev-parse", "HEAD") == result["commit"] and file_md5(field) == result["md5"]

    # A later export overlapping the first: only its new records are added, cumulatively.
    X2, y2 = digits(10, offset=1040)
    records = digit_records(X[25:30], y[25:30], start=25) + digit_records(X2, y2, start=100)
    write_export(tmp_path / "export", records)
    code, third = _add(capsys, tmp_path / "export", project)
    assert code == 0 and third["added"] == 10 and third["skipped_duplicates"] == 5 and third["rows"] == 40
    assert third["previous_md5"] == result["md5"] and third["md5"] == recorded_md5(dvc_file) != result["md5"]
    assert len(json.loads((root / "data" / "field-manifest.json").read_text())["entries"]) == 2
    assert git(root, "status", "--porcelain") == ""


def test_bad_exports_are_refused_and_leave_the_field_data_alone(project: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = project.parent
    X, y = digits(12)
    write_export(tmp_path / "good", digit_records(X, y))
    assert _add(capsys, tmp_path / "good", project)[0] == 0
    field = root / "data" / "field.npz"
    before = (field.read_bytes(), (root / "data" / "field.npz.dvc").read_text(), project.read_text(),
              git(root, "rev-parse", "HEAD"))

    def unchanged() -> bool:
        return before == (field.read_bytes(), (root / "data" / "field.npz.dvc").read_text(), project.read_text(),
                          git(root, "rev-parse", "HEAD"))

    flat = [capture_record(50 + i, X[i].reshape(64), label=str(int(y[i]))) for i in range(4)]
    write_export(tmp_path / "flat", flat)
    assert main(["data", "add", str(tmp_path / "flat"), "--config", str(project)]) == 2
    assert "shape [64]" in capsys.readouterr().err and unchanged()

    strange = [capture_record(60, X[0], label="cat"), capture_record(61, X[1], label="3")]
    write_export(tmp_path / "strange", strange)
    assert main(["data", "add", str(tmp_path / "strange"), "--config", str(project)]) == 2
    assert "'cat'" in capsys.readouterr().err and unchanged()

    write_export(tmp_path / "unlabelled", digit_records(X, y, start=70, labelled=0))
    assert main(["data", "add", str(tmp_path / "unlabelled"), "--config", str(project)]) == 2
    assert "none of its 12 records is labelled" in capsys.readouterr().err and unchanged()

    (tmp_path / "empty").mkdir()
    assert main(["data", "add", str(tmp_path / "empty"), "--config", str(project)]) == 2
    assert "manifest.json" in capsys.readouterr().err and unchanged()

    # A field file changed behind DVC's back is refused, and kept as it is.
    middle = len(before[0]) // 2
    field.write_bytes(before[0][:middle] + bytes([before[0][middle] ^ 1]) + before[0][middle + 1:])
    tampered = field.read_bytes()
    write_export(tmp_path / "more", digit_records(*digits(4, offset=500), start=200))
    assert main(["data", "add", str(tmp_path / "more"), "--config", str(project)]) == 2
    assert "does not match its DVC record" in capsys.readouterr().err and field.read_bytes() == tampered


def test_without_git_or_with_no_commit_nothing_is_committed(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = training.make_project(tmp_path / "nogit", training.tiny_config(), scm=False)
    X, y = digits(8)
    write_export(tmp_path / "export", digit_records(X, y))
    code, result = _add(capsys, tmp_path / "export", config)
    assert code == 0 and result["added"] == 8 and not result["committed"]
    assert result["reason"] == "the project is not inside a git work tree"
    assert recorded_md5(tmp_path / "nogit" / "data" / "field.npz.dvc") == result["md5"]

    project = make_project(tmp_path / "proj")
    head = git(project.parent, "rev-parse", "HEAD")
    code, result = _add(capsys, tmp_path / "export", project, "--no-commit")
    assert code == 0 and not result["committed"] and result["reason"] == "--no-commit"
    assert git(project.parent, "rev-parse", "HEAD") == head
    assert "edgekit.toml" in git(project.parent, "status", "--porcelain")


DVC_YAML = """\
# The pipeline (comments stay).
stages:
  train:
    # trains on the snapshot
    cmd: edge-kit train --config edgekit.toml
    deps:
      - data/digits.npz   # the base snapshot
      - edgekit.toml
    outs:
      - .edgekit/train.json:
          cache: false
  other:
    cmd: echo hi
    deps:
      - data/digits.npz
"""


def test_the_train_stage_gets_the_field_data_as_a_dep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = make_project(tmp_path / "proj", files={"dvc.yaml": DVC_YAML})
    write_export(tmp_path / "export", digit_records(*digits(6)))
    code, result = _add(capsys, tmp_path / "export", project)
    assert code == 0 and result["dvc_yaml_updated"] and result["committed"]
    text = (project.parent / "dvc.yaml").read_text()
    assert text == DVC_YAML.replace("      - data/digits.npz   # the base snapshot\n",
                                    "      - data/digits.npz   # the base snapshot\n      - data/field.npz\n")
    assert "dvc.yaml" in git(project.parent, "show", "--name-only", "--format=", "HEAD").splitlines()
    # More field data later: DVC records it while the stage depends on it; the stage is not edited twice.
    write_export(tmp_path / "export", digit_records(*digits(6, offset=300), start=50))
    code, more = _add(capsys, tmp_path / "export", project)
    assert code == 0 and more["added"] == 6 and not more["dvc_yaml_updated"] and more["committed"]
    assert (project.parent / "dvc.yaml").read_text() == text


def test_set_toml_key_keeps_comments() -> None:
    text = '[project]\nname = "x"\n\n[data]\nsource = "sklearn:digits"  # built in\nseed = 0\n\n[model]\nkwargs = {}\n'
    added = set_toml_key(text, "data", "field", "data/field.npz")
    assert added == text.replace("seed = 0\n", 'seed = 0\nfield = "data/field.npz"\n')
    again = set_toml_key(added.replace('field = "data/field.npz"', 'field = "old.npz"  # set by data add'),
                         "data", "field", "data/field.npz")
    assert 'field = "data/field.npz"  # set by data add' in again
    assert set_toml_key("[project]\nname = 'x'", "data", "field", "f.npz") == \
        "[project]\nname = 'x'\n\n[data]\nfield = \"f.npz\"\n"
