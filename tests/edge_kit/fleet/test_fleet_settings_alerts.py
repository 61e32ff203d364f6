"""Fleet config validation and the alert/retraining life cycle."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from edge_kit.errors import AlertError, ConfigError, UsageError
from edge_kit.fleet.alerts import AlertManager
from edge_kit.fleet.settings import AlertSettings, load_settings, parse_settings
from edge_kit.fleet.storage import Storage


def test_defaults_and_overrides(tmp_path: Path) -> None:
    assert load_settings(None).drift.alpha == 0.01
    f = tmp_path / "fleet.toml"
    f.write_text('[drift]\nalpha = 0.05\nk = 1\nm = 1\n[alerts]\nretrain_command = "dvc repro --force"\n')
    s = load_settings(f)
    assert (s.drift.alpha, s.drift.k, s.drift.m) == (0.05, 1, 1)
    assert s.alerts.retrain_command == ["dvc", "repro", "--force"]


@pytest.mark.parametrize("raw,key", [
    ({"drift": {"alpah": 0.1}}, "drift.alpah"),
    ({"drfit": {}}, "drfit"),
    ({"drift": {"alpha": 0.7}}, "drift.alpha"),
    ({"drift": {"k": 4, "m": 3}}, "drift.k"),
    ({"drift": {"min_n": "100"}}, "drift.min_n"),
    ({"drift": {"min_n": True}}, "drift.min_n"),
    ({"alerts": {"approval": "sometimes"}}, "alerts.approval"),
    ({"alerts": {"retrain_command": [1, 2]}}, "alerts.retrain_command"),
    ({"ingest": {"max_payload_bytes": 0}}, "ingest.max_payload_bytes"),
])
def test_bad_config_names_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_settings(raw)
    assert exc.value.key == key and exc.value.exit_code == 2


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[drift\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_settings(bad)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(f"sqlite:///{tmp_path}/fleet.db")


def test_auto_approval_runs_at_once_and_rate_limit_expires(storage: Storage) -> None:
    clock = Clock()
    mgr = AlertManager(storage, AlertSettings(approval="auto", retrain_command=[sys.executable, "-c", "pass"],
                                              retrain_min_interval_seconds=600), clock)
    a1, created = mgr.raise_alert("m1", "fleet", "data_drift", "drift", {})
    assert created
    mgr.wait()
    assert storage.alert(a1)["state"] == "retrained"  # type: ignore[index]
    assert mgr.raise_alert("m1", "fleet", "data_drift", "again", {}) == (a1, False)  # one alert per condition
    a2, _ = mgr.raise_alert("m2", "fleet", "data_drift", "other model", {})
    assert storage.alert(a2)["state"] == "rate_limited"  # type: ignore[index]
    clock.now += 601
    mgr.approve(a2, "bob")
    mgr.wait()
    a = storage.alert(a2)
    assert a is not None and a["state"] == "retrained"
    assert [t["outcome"] for t in a["triggers"]] == ["rate_limited", "succeeded"]


def test_failed_and_missing_commands_are_recorded(storage: Storage) -> None:
    mgr = AlertManager(storage, AlertSettings(retrain_command=[sys.executable, "-c", "import sys; sys.exit(3)"],
                                              retrain_min_interval_seconds=0))
    a, _ = mgr.raise_alert("m", "device:d1", "data_drift", "drift", {})
    assert storage.alert(a)["state"] == "pending_approval"  # type: ignore[index]
    mgr.approve(a)
    mgr.wait()
    alert = storage.alert(a)
    assert alert is not None and alert["state"] == "retrain_failed"
    assert alert["triggers"][-1]["outcome"] == "failed" and alert["triggers"][-1]["returncode"] == 3
    # A failed retraining lets the condition raise a fresh alert.
    assert mgr.raise_alert("m", "device:d1", "data_drift", "drift", {})[1]
    missing = AlertManager(storage, AlertSettings(retrain_command=["/nonexistent/retrain"],
                                                  retrain_min_interval_seconds=0))
    b, _ = missing.raise_alert("m3", "fleet", "data_drift", "x", {})
    missing.approve(b)
    missing.wait()
    alert = storage.alert(b)
    assert alert is not None and alert["triggers"][-1]["outcome"] == "failed"
    assert "could not start" in alert["triggers"][-1]["output"]
    none = AlertManager(storage, AlertSettings())
    c, _ = none.raise_alert("m4", "fleet", "data_drift", "x", {})
    assert none.approve(c)["triggers"][-1]["outcome"] == "no_command"
    with pytest.raises(AlertError):
        none.approve(c)
    assert none.dismiss(c)["state"] == "dismissed"


def test_timeout_is_recorded(storage: Storage) -> None:
    mgr = AlertManager(storage, AlertSettings(retrain_command=[sys.executable, "-c", "import time; time.sleep(30)"],
                                              retrain_timeout_seconds=0.5, approval="auto"))
    a, _ = mgr.raise_alert("m", "fleet", "data_drift", "x", {})
    mgr.wait()
    alert = storage.alert(a)
    assert alert is not None and alert["triggers"][-1]["outcome"] == "timeout"
    assert alert["state"] == "retrain_failed"


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped (a killed orphan may linger as one in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_timed_out_retraining_leaves_no_child_alive(storage: Storage, tmp_path: Path) -> None:
    # The command starts a child (like a build starting a compiler) and waits; the timeout must kill both.
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time, pathlib; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"pathlib.Path({str(pidfile)!r}).write_text(str(c.pid)); time.sleep(120)")
    mgr = AlertManager(storage, AlertSettings(retrain_command=[sys.executable, "-c", script],
                                              retrain_timeout_seconds=2.0, approval="auto"))
    a, _ = mgr.raise_alert("m", "fleet", "data_drift", "x", {})
    mgr.wait()
    alert = storage.alert(a)
    assert alert is not None and alert["triggers"][-1]["outcome"] == "timeout"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(child), f"the retraining command's child {child} outlived the timeout"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
