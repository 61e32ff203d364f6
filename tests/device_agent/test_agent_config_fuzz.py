"""Property-based: any TOML text given to the config readers (device_agent.strict_toml, the agent's
settings; the project config in tests/edge_kit/test_project_config_fuzz.py) gives a config or a
UsageError/ConfigError (exit 2), nothing else, and a config that loads holds only finite numbers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from device_agent.settings import AgentSettings, MqttSettings, load_settings
from device_agent.strict_toml import read_toml
from tests.helpers.config_fuzz import FUZZ, documents, finite_numbers, load_or_refuse, toml_text

AGENT_KEYS = [f.name for f in dataclasses.fields(AgentSettings) if f.name != "mqtt"]
MQTT_KEYS = [f.name for f in dataclasses.fields(MqttSettings)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cfg")


@settings(FUZZ, max_examples=30)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_text_to_any_reader(folder: Path, text: str | bytes) -> None:
    for loader in (read_toml, load_settings):
        load_or_refuse(loader, folder / "any.toml", text)


@FUZZ
@example(doc={"agent": {"window_seconds": math.nan}})
@example(doc={"agent": {"watch_interval": math.inf}})
@example(doc={"agent": {"spool": "a\0b"}})
@given(doc=documents({"agent": AGENT_KEYS, "mqtt": MQTT_KEYS}))
def test_agent_settings(folder: Path, doc: dict[str, dict[str, Any]]) -> None:
    loaded = load_or_refuse(load_settings, folder / "agent.toml", toml_text(doc))
    if loaded is not None:
        assert isinstance(loaded, AgentSettings) and finite_numbers(loaded) and finite_numbers(loaded.mqtt)
