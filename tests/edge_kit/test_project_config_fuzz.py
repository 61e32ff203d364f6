"""Property-based: any TOML text or document given to `edge_kit.config.load_config` gives a Config or a
UsageError/ConfigError (exit 2), nothing else; a config that loads holds only finite numbers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge_kit.config import Config, load_config
from tests.helpers.config_fuzz import FUZZ, documents, finite_numbers, load_or_refuse, toml_text

PROJECT_SECTIONS = {
    "project": ["name", "version"],
    "data": ["source", "test_fraction", "seed", "label_column"],
    "model": ["factory", "kwargs"],
    "train": ["epochs", "batch_size", "lr", "seed", "checkpoint_every", "keep_checkpoints", "device", "threads"],
    "quantize": ["backend", "calibration", "calibration_samples", "per_channel", "target"],
    "gate": ["metric", "max_drop", "max_relative_drop", "max_fallback_rounds"],
    "monitor": ["bins"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cfg")


@settings(FUZZ, max_examples=30)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_text(folder: Path, text: str | bytes) -> None:
    load_or_refuse(load_config, folder / "any.toml", text)


@FUZZ
@example(doc={"data": {"source": "npz:a\0b"}})
@example(doc={"gate": {"max_relative_drop": math.nan}})
@example(doc={"data": {"source": "npz:" + "a" * 300}})
@given(doc=documents(PROJECT_SECTIONS))
def test_project_config(folder: Path, doc: dict[str, dict[str, Any]]) -> None:
    loaded = load_or_refuse(load_config, folder / "project.toml", toml_text(doc))
    if loaded is not None:
        assert isinstance(loaded, Config) and all(
            finite_numbers(getattr(loaded, f.name)) for f in dataclasses.fields(loaded) if f.name != "path")
