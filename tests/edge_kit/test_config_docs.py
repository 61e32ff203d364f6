"""Config keys carry their own rules and descriptions; each program's config page is generated from them."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import calibration.methods
from device_agent.settings_schema import THREADS_DOC, check_rules, keys_of, markdown, rule_of, setting
from edge_kit.config import PAGE, SECTIONS, load_config
from edge_kit.errors import EXIT_USAGE, ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgekit.toml"
    path.write_text(text)
    return path


def generated_pages() -> list[tuple[str, str]]:
    """(module, page) pairs `make docs` writes, read from the Makefile so the two cannot disagree."""
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^CONFIG_PAGES = ((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
    assert block is not None, "Makefile has no CONFIG_PAGES"
    return [tuple(item.split(":")) for item in block.group(1).replace("\\", " ").split()]  # type: ignore[misc]


def test_make_docs_writes_one_page_per_program() -> None:
    assert generated_pages() == [("edge_kit.config", "docs/config.md"),
                                 ("edge_kit.fleet.settings", "docs/config-fleet.md"),
                                 ("device_agent.settings", "docs/config-agent.md")]


@pytest.mark.parametrize(("module", "page"), generated_pages())
def test_checked_in_config_pages_are_current(module: str, page: str) -> None:
    assert (ROOT / page).read_text() == importlib.import_module(module).PAGE.markdown(), \
        f"{page} is out of date: run `make docs`"


@pytest.mark.parametrize(("module", "page"), generated_pages())
def test_markdown_command_prints_the_page(module: str, page: str) -> None:
    """What `make docs` runs for each page."""
    out = subprocess.run([sys.executable, "-m", module, "--markdown"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out == importlib.import_module(module).PAGE.markdown()


def test_every_key_of_every_section_is_documented() -> None:
    page = PAGE.markdown()
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
    assert "`minmax`, `entropy`, `percentile`, `mse`" in PAGE.markdown()


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


def test_threads_zero_means_the_same_in_every_config() -> None:
    """Every `threads` key of the three configs allows 0 and says it means the library's default."""
    from device_agent.settings import SECTIONS as AGENT_SECTIONS
    from edge_kit.fleet.settings import SECTIONS as FLEET_SECTIONS

    found = []
    for sections in (SECTIONS, FLEET_SECTIONS, AGENT_SECTIONS):
        for name, cls in sections.items():
            for f in keys_of(cls):
                if f.name == "threads":
                    found.append(f"{name}.threads")
                    assert rule_of(f).lo == 0 and not rule_of(f).open_lo and THREADS_DOC in rule_of(f).doc, name
    assert found == ["train.threads", "quantize.threads", "agent.threads"]


@pytest.mark.parametrize(("raw", "key", "message"), [
    ({"drift": {"alpha": 0.5}}, "drift.alpha", "must be between 0 and 0.5, got 0.5"),
    ({"drift": {"alpha": 0.0}}, "drift.alpha", "must be between 0 and 0.5, got 0.0"),
    ({"drift": {"k": 3, "m": 2}}, "drift.k", "need 1 <= k <= m, got k=3, m=2"),
    ({"drift": {"m": 0, "k": 1}}, "drift.k", "need 1 <= k <= m, got k=1, m=0"),
    ({"ingest": {"batch_size": 0}}, "ingest.batch_size", "must be at least 1, got 0"),
    ({"alerts": {"retrain_min_interval_seconds": -1}}, "alerts.retrain_min_interval_seconds", "must be 0 or more"),
    ({"alerts": {"approval": "later"}}, "alerts.approval", "'later' is not allowed"),
])
def test_fleet_keys_are_checked_by_their_declared_rules(raw: dict[str, dict[str, object]], key: str,
                                                        message: str) -> None:
    from edge_kit.fleet.settings import parse_settings

    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert info.value.key == key and message in info.value.message


def test_fleet_edges_that_are_allowed() -> None:
    from edge_kit.fleet.settings import parse_settings

    s = parse_settings({"drift": {"alpha": 0.49, "k": 3, "m": 3, "max_device_weight": 0},
                        "alerts": {"retrain_min_interval_seconds": 0}})
    assert (s.drift.k, s.drift.m, s.drift.max_device_weight) == (3, 3, 0.0)
