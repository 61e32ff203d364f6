"""The agent config declares its keys like the project config: default, description and rule in one place,
enforced on the file and on the flags alike, and rendered as docs/config-agent.md."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from device_agent.errors import EXIT_USAGE, ConfigError
from device_agent.runtime import session_options
from device_agent.settings import PAGE, SECTIONS, AgentSettings, HttpSettings, apply_flags, load_settings
from device_agent.settings_schema import THREADS_DOC, keys_of, rule_of


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "key"), [
    ("[agent]\nspool_max_windows = 0\n", "agent.spool_max_windows"),  # the spool cannot hold zero windows
    ("[agent]\nwatch_interval = 0\n", "agent.watch_interval"),
    ("[agent]\nthreads = -1\n", "agent.threads"),
    ("[mqtt]\nkeepalive = -1\n", "mqtt.keepalive"),
    ("[mqtt]\nreconnect_max = 0.0\n", "mqtt.reconnect_max"),
    ("[http]\nmax_samples = 0\n", "http.max_samples"),
    ("[http]\ntimeout = 0\n", "http.timeout"),
    ("[http]\nrequest_timeout = 5\n", "http.request_timeout"),  # the key users type is `timeout`
    ("[agent]\nspool = \"\"\n", "agent.spool"),
])
def test_each_key_has_its_own_rule(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert err.value.key == key and err.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("text", [
    "[agent]\nthreads = 0\n", "[mqtt]\nkeepalive = 0\nsession_expiry = 0\n", "[http]\nrequest_memory_bytes = 0\n",
    "[agent]\nspool_max_windows = 1\n",
])
def test_the_edges_that_are_allowed_load(tmp_path: Path, text: str) -> None:
    load_settings(write(tmp_path, text))


def test_a_flag_follows_the_rule_of_its_key(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[agent]\nbundle = "b"\ndevice_id = "d"\n'))
    flags = {"http_max_samples": None, "http_max_body_bytes": None, "http_max_connections": None,
             "http_timeout": None}
    with pytest.raises(ConfigError, match=r"'--window-seconds': must be positive, got 0"):
        apply_flags(settings, argparse.Namespace(window_seconds=0.0, **flags))
    with pytest.raises(ConfigError, match=r"'--http-max_connections': must be at least 1, got 0"):
        apply_flags(settings, argparse.Namespace(**{**flags, "http_max_connections": 0}))
    merged = apply_flags(settings, argparse.Namespace(**{**flags, "http_timeout": 2.5}))
    assert merged.http_limits.request_timeout == 2.5


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    loaded = load_settings(write(tmp_path, '[agent]\nbundle = "bundles"\n[mqtt]\nca_certs = "/abs/ca.pem"\n'))
    assert loaded.bundle == tmp_path / "bundles" and loaded.mqtt.ca_certs == Path("/abs/ca.pem")


def test_http_defaults_are_the_servers_own() -> None:
    assert HttpSettings().limits() == AgentSettings().http_limits


def test_threads_zero_is_onnx_runtimes_default_and_one_thread_is_the_default() -> None:
    threads = next(f for f in keys_of(AgentSettings) if f.name == "threads")
    assert AgentSettings().threads == 1 and rule_of(threads).lo == 0 and THREADS_DOC in rule_of(threads).doc
    assert session_options().intra_op_num_threads == 1
    assert session_options(0).intra_op_num_threads == 0  # ORT: 0 = its default thread pool (all cores)
    assert session_options(3).intra_op_num_threads == 3


def test_the_page_lists_every_key_of_every_section() -> None:
    page = PAGE.markdown()
    for name, cls in SECTIONS.items():
        assert f"## [{name}]" in page
        for f in keys_of(cls):
            assert f"| `{f.name}` |" in page
    # The nested sections are tables of their own, not keys of [agent].
    assert not any(f.name in ("mqtt", "http_limits") for f in keys_of(AgentSettings))
    assert {f.name for f in dataclasses.fields(AgentSettings)} >= {"mqtt", "http_limits"}
