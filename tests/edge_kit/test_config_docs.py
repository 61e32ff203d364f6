"""Config keys carry their own rules and descriptions; docs/config.md is generated from them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import calibration.methods
from edge_kit.config import SECTIONS, check_rules, config_markdown, load_config, markdown, setting
from edge_kit.errors import EXIT_USAGE, ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgekit.toml"
    path.write_text(text)
    return path


def test_checked_in_config_page_is_current() -> None:
    page = (ROOT / "docs" / "config.md").read_text()
    assert page == config_markdown(), "docs/config.md is out of date: run `make docs`"


def test_markdown_command_prints_the_page() -> None:
    out = subprocess.run([sys.executable, "-m", "edge_kit.config", "--markdown"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out == config_markdown()


def test_every_key_of_every_section_is_documented() -> None:
    page = config_markdown()
    for name, cls in SECTIONS.items():
        assert f"## [{name}]" in page
        for key in (f.name for f in dataclasses.fields(cls)):
            assert f"| `{key}` |" in page


def test_calibration_methods_are_the_ones_calibration_defines(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One list: a method added in calibration/methods.py is accepted and documented, no second copy to edit."""
    path = write(tmp_path, '[quantize]\ncalibration = "mse"\n')
    with pytest.raises(ConfigError, match=r"'mse' is not allowed \(allowed: minmax, entropy, percentile\)"):
        load_config(path)
    monkeypatch.setattr(calibration.methods, "CALIBRATION_METHODS", (*calibration.methods.CALIBRATION_METHODS, "mse"))
    assert load_config(path).quantize.calibration == "mse"
    assert "`minmax`, `entropy`, `percentile`, `mse`" in config_markdown()


@pytest.mark.parametrize(("text", "ok"), [
    ("[data]\ntest_fraction = 0.0\n", False), ("[data]\ntest_fraction = 0.999\n", True),
    ("[gate]\nmax_drop = 0\n", True), ("[gate]\nmax_drop = 1\n", True), ("[gate]\nmax_drop = 1.01\n", False),
    ("[gate]\nmax_relative_drop = -0.1\n", False), ("[gate]\nmax_fallback_rounds = 0\n", True),
    ("[gate]\nmax_fallback_rounds = -1\n", False), ("[train]\nthreads = 0\n", True),
    ("[train]\nthreads = -1\n", False), ("[train]\nlr = 0\n", False), ("[monitor]\nbins = 2\n", True),
    ("[monitor]\nbins = 256\n", True), ("[monitor]\nbins = 1\n", False), ("[monitor]\nbins = 0\n", False),
])
def test_bounds_are_exact_at_their_edges(tmp_path: Path, text: str, ok: bool) -> None:
    if ok:
        load_config(write(tmp_path, text))
    else:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        assert info.value.exit_code == EXIT_USAGE and "got" in info.value.message


def test_a_new_key_is_one_line_checked_and_documented() -> None:
    @dataclass(frozen=True)
    class Section:
        """A section of a test."""

        workers: int = setting(1, "processes that train in parallel", lo=1)
        engine: str = setting("local", "where training runs", choices=("local", "ray"))

    @dataclass(frozen=True)
    class Whole:
        train: Section

    check_rules(Whole(Section()), {"train": Section})
    with pytest.raises(ConfigError, match=r"config key 'train.workers': must be at least 1, got 0"):
        check_rules(Whole(Section(workers=0)), {"train": Section})
    with pytest.raises(ConfigError, match=r"'spark' is not allowed \(allowed: local, ray\)"):
        check_rules(Whole(Section(engine="spark")), {"train": Section})
    page = markdown("T", "intro", {"train": Section})
    assert "| `workers` | int | `1` | at least 1 | processes that train in parallel |" in page
    assert "| `engine` | str | `\"local\"` | `local`, `ray` | where training runs |" in page


def test_a_field_without_a_rule_is_refused() -> None:
    @dataclass(frozen=True)
    class Bare:
        """No description."""

        x: int = 1

    with pytest.raises(TypeError, match="not declared with setting"):
        markdown("T", "intro", {"bare": Bare})
