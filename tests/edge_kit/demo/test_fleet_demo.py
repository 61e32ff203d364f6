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


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.integration
def test_headless_demo_retrains_deploys_through_a_canary_and_rolls_back_a_skewed_bundle(tmp_path: Path) -> None:
    """alert -> approve -> retrain -> canary -> promote to every device (each with its own bundles folder);
    then a bundle that verifies and passes its self-test but skews predictions is halted at the canary."""
    example = (REPO_ROOT / "examples" / "digits" / "edgekit.toml").read_text()
    config = tmp_path / "digits.toml"
    config.write_text(example.replace("epochs = 15", f"epochs = {FAST_EPOCHS}"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GIT_PYTHON_REFRESH": "quiet"}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_kit.demo.fleet", "--headless", "--duration", "60", "--approve", "--bad-bundle",
         "--json", "--workdir", str(tmp_path / "demo"), "--config", str(config), "--http-port", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["retrain"]["outcome"] == "succeeded", summary["retrain"]
    deployments = {d["what"]: d for d in summary["deployments"]}
    good, bad = deployments["retrained"], deployments["skewed"]
    assert good["state"] == "done" and good["canary_passed"] is True, good
    assert bad["state"] == "rolled_back" and "predicted_class" in bad["failing"], bad
    canary = [d for d, v in bad["devices"].items() if v["role"] == "canary"]
    assert len(canary) == 1 and bad["devices"][canary[0]]["state"] == "rolled_back"
    for device, served in summary["retrain"]["models_served"].items():
        assert good["version"] in served, (device, served)
        # Only the canary ever answered with the skewed bundle; every device ends on the retrained one.
        assert (bad["version"] in served) == (device == canary[0]), (device, served)
        assert bad["devices"][device]["version"] == good["version"], bad["devices"]
    assert any(a["kind"] == "canary_failed" for a in summary["alerts"])
    assert not list((tmp_path / "demo" / "bundles").glob("*.post1.edgebundle"))  # the bad bundle is not kept

    # The retraining trained on what the flagged devices captured, and the new version copes with their inputs:
    # scored on held-out digits neither version trained on (the feeders' second pool), at full shift severity.
    field = summary["field_data"]
    assert field["added"] > 0 and set(field["devices"]) <= set(summary["flagged"]), field
    shifted, clean = summary["shifted_accuracy"], summary["clean_accuracy"]
    assert shifted["after"] > shifted["before"], shifted
    assert clean["after"] >= clean["before"] - 0.05, clean  # a loose guard: 4 epochs here, each side ~1,000 samples
    for d in summary["devices"]:
        assert d["accuracy_before"] is not None and d["accuracy_after"] is not None, d
        assert d["labelled_after"] >= 4 * 160, d
    assert summary["still_flagged"]["version"] == good["version"] and summary["still_flagged"]["why"]
    # The field data is a DVC snapshot committed to the project's git, and the new bundle names it.
    project = tmp_path / "demo" / "project"
    log = subprocess.run(["git", "log", "--format=%s"], cwd=project, capture_output=True, text=True, check=True)
    assert "field data" in log.stdout.lower(), log.stdout
    from device_agent.bundle.format import read_bundle

    retrained = next(p for p in (tmp_path / "demo" / "bundles").glob("*.edgebundle")
                     if read_bundle(p).version == good["version"])
    provenance = read_bundle(retrained).manifest["provenance"]
    assert provenance["data"]["field"]["dvc_md5"] == field["md5"], provenance["data"]
    assert provenance["git"]["dirty"] is False, provenance["git"]
