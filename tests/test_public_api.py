"""What each package offers is written down (`__all__`) and pinned here, and the device agent's front
door (`from device_agent import Agent`) costs nothing until it is used.

A name added to or dropped from a package's `__all__` is an API change: change the table below with it.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("device_agent", "edge_kit", "calibration")

PINNED: dict[str, list[str]] = {
    "device_agent": ["Agent", "EdgeKitError", "InputError", "LoadedModel", "Prediction", "UsageError",
                     "VerificationError", "load_model"],
    "device_agent.bundle": [],
    "device_agent.capture": [],
    "edge_kit": ["__version__"],
    "edge_kit.bench": ["BenchPlan", "BenchSettings", "EngineSpec", "TorchModelSpec", "run_bench"],
    "edge_kit.commands": [],
    "edge_kit.compile": [],
    "edge_kit.demo": [],
    "edge_kit.fleet": [],
    "edge_kit.fleet.captures": [],
    "edge_kit.ship": [],
    "edge_kit.train": [],
    "calibration": ["CALIBRATION_METHODS", "BatchedCalibrationReader", "CalibrationError", "CalibrationPreset",
                    "CalibrationSelection", "compute_ranges", "load_ranges", "preset_for", "select_calibration"],
}
# Packages whose owners have not declared `__all__` yet: each one that does must leave this set.
AWAITING: set[str] = {
    "device_agent.deploy", "device_agent.http", "device_agent.monitoring", "device_agent.uplink",
    "edge_kit.compile.quantize", "edge_kit.fleet.deployments", "edge_kit.fleet.migrations",
}
# Folders that are packages only for the tool that loads them, not an API.
NOT_AN_API = {"edge_kit.fleet.migrations.versions"}  # Alembic's revision scripts


def packages() -> list[str]:
    found = []
    for root in ROOTS:
        for init in sorted((REPO / root).rglob("__init__.py")):
            found.append(".".join(init.parent.relative_to(REPO).parts))
    return [p for p in found if p not in NOT_AN_API]


def declared_all(package: str) -> list[str] | None:
    """The literal `__all__` of a package's __init__.py, read from the source (nothing imported)."""
    tree = ast.parse((REPO / package.replace(".", "/") / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            return list(ast.literal_eval(node.value))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "__all__" and node.value:
            return list(ast.literal_eval(node.value))
    return None


def test_every_package_says_what_is_public() -> None:
    missing = {p for p in packages() if declared_all(p) is None}
    assert missing - AWAITING == set(), f"declare __all__ in {sorted(missing - AWAITING)}"
    assert AWAITING - missing == set(), f"{sorted(AWAITING - missing)} now declare __all__: pin them in PINNED"
    unpinned = set(packages()) - AWAITING - set(PINNED)
    assert not unpinned, f"pin the public names of {sorted(unpinned)}"


@pytest.mark.parametrize("package", sorted(PINNED))
def test_public_names_are_pinned_and_exist(package: str) -> None:
    names = declared_all(package)
    assert names is not None and sorted(names) == sorted(PINNED[package]), f"{package}.__all__ changed: {names}"
    assert len(set(names)) == len(names), f"{package}.__all__ repeats a name"
    module = importlib.import_module(package)
    absent = [n for n in names if not hasattr(module, n)]
    assert not absent, f"{package}.__all__ names what it does not have: {absent}"


def test_the_front_door_is_the_agent_and_errors_stay_cheap() -> None:
    probe = (
        "import sys\n"
        "import device_agent.errors\n"
        "heavy = sorted(m for m in ('onnxruntime', 'numpy', 'device_agent.agent') if m in sys.modules)\n"
        "print('AFTER_ERRORS', heavy)\n"
        "from device_agent import Agent, VerificationError\n"
        "import device_agent.agent, device_agent.errors\n"
        "print('SAME', Agent is device_agent.agent.Agent, VerificationError is device_agent.errors.VerificationError)\n"
        "try:\n"
        "    device_agent.NoSuchThing\n"
        "except AttributeError as exc:\n"
        "    print('MISSING', exc)\n"
        "print('DIR', 'Agent' in dir(device_agent))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "AFTER_ERRORS []" in lines, proc.stdout  # no ONNX Runtime, no numpy, no agent for the error tree
    assert "SAME True True" in lines
    assert "MISSING module 'device_agent' has no attribute 'NoSuchThing'" in lines
    assert "DIR True" in lines
