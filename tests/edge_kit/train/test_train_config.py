"""Config validation: every mistake names its key and exits 2; good configs fill in the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_kit.config import load_config
from edge_kit.errors import EXIT_USAGE, ConfigError, UsageError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgekit.toml"
    path.write_text(text)
    return path


def test_defaults_fill_in_missing_sections(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[project]\nname = "x"\n'))
    assert config.data.source == "sklearn:digits"
    assert config.train.epochs == 15 and config.train.checkpoint_every == 50
    assert config.quantize.backend == "ort" and config.monitor.bins == 32
    assert config.root == tmp_path.resolve()
    assert config.to_dict()["project"] == {"name": "x", "version": "1.0.0"}


def test_int_accepted_for_float(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[train]\nlr = 1\n")).train.lr == 1.0


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("[trian]\nepochs = 3\n", "trian", "unknown section"),
    ("[train]\nepoch = 3\n", "train.epoch", "unknown key"),
    ('[train]\nepochs = "3"\n', "train.epochs", "must be int"),
    ("[train]\nepochs = true\n", "train.epochs", "boolean"),
    ("[train]\nepochs = 0\n", "train.epochs", "at least 1"),
    ("[train]\nlr = -0.1\n", "train.lr", "positive"),
    ('[train]\ndevice = "tpu"\n', "train.device", "auto, cpu, cuda"),
    ("[data]\ntest_fraction = 1.5\n", "data.test_fraction", "between 0 and 1"),
    ('[data]\nsource = "sklearn:mnist"\n', "data.source", "unknown dataset"),
    ('[data]\nsource = "parquet:x.parquet"\n', "data.source", "unknown source"),
    ('[data]\nsource = "npz:missing.npz"\n', "data.source", "file not found"),
    ('[model]\nfactory = "no_colon"\n', "model.factory", "module:function"),
    ("[model]\nkwargs = 3\n", "model.kwargs", "table"),
    ('[quantize]\nbackend = "tensorrt"\n', "quantize.backend", "not allowed"),
    ("[monitor]\nbins = 1000\n", "monitor.bins", "between 2 and 256"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and fragment in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


def test_csv_source_needs_label_column(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,x\n")
    with pytest.raises(ConfigError, match=r"data\.label_column"):
        load_config(write(tmp_path, '[data]\nsource = "csv:d.csv"\n'))


def test_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.npz").write_bytes(b"")
    config = load_config(write(tmp_path / "sub", '[data]\nsource = "npz:d.npz"\n'))
    assert config.resolve("d.npz") == (tmp_path / "sub" / "d.npz").resolve()


def test_missing_file_and_bad_toml_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_cli_reports_one_line_and_exit_2(tmp_path: Path, edge_kit_cli) -> None:
    config = write(tmp_path, "[train]\nepohcs = 3\n")
    result = edge_kit_cli("train", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "config key 'train.epohcs': unknown key" in lines[-1]
    assert "Traceback" not in result.stderr


def test_cli_unimportable_factory_exits_2(tmp_path: Path, edge_kit_cli) -> None:
    config = write(tmp_path, '[model]\nfactory = "nonexistent_module_xyz:build"\n')
    result = edge_kit_cli("train", "--config", str(config), "--json")
    assert result.returncode == 2
    assert "config key 'model.factory'" in result.stderr and "nonexistent_module_xyz" in result.stderr
    assert result.json()["exit_code"] == 2
