"""`make fleet-demo`, headless and short: the real build, Mosquitto, fleet server and agent processes.

It must flag exactly the devices fed shifted inputs, and every window an agent closed must be stored
by the server (none lost between agents and server, none left in a spool)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
# The example with fewer epochs: the demo's detection does not need the best model, and CI time is short.
FAST_EPOCHS = 4


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.integration
def test_headless_demo_flags_exactly_the_shifted_devices_and_loses_no_window(tmp_path: Path) -> None:
    example = (REPO_ROOT / "examples" / "digits" / "edgekit.toml").read_text()
    assert "epochs = 15" in example
    config = tmp_path / "digits.toml"
    config.write_text(example.replace("epochs = 15", f"epochs = {FAST_EPOCHS}"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GIT_PYTHON_REFRESH": "quiet"}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_kit.demo.fleet", "--headless", "--duration", "45", "--json",
         "--workdir", str(tmp_path / "demo"), "--config", str(config), "--http-port", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    assert summary["shifted"] == ["dev-2", "dev-4", "dev-6"]
    assert summary["flagged"] == summary["shifted"], summary["alerts"]
    by_device = {d["device"]: d for d in summary["devices"]}
    for name, d in by_device.items():
        assert d["windows_closed"] >= 5, d
        assert d["windows_stored"] == d["windows_closed"], d
        assert d["windows_in_spool"] == 0 and d["windows_lost"] == 0, d
        assert d["request_errors"] == 0, d
        if name in summary["shifted"]:
            # Detected after the shift began, within a few windows of it.
            assert 0 < d["detection_seconds"] < 8 * summary["window_seconds"], d
    assert summary["windows_lost"] == 0
    assert summary["windows_stored"] == summary["windows_closed"] > 0
