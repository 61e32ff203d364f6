"""The device agent's folders show its jobs, and every import points down the layers, never back up.

    kernel      errors, atomic, host, strict_toml, settings_schema, cli_runner,  (imports only the kernel)
                durable_sqlite
    bundle      which bundle may serve                                          (kernel)
    uplink      getting summaries out over MQTT                                 (kernel)
    monitoring  what the model sees                                             (kernel, bundle's format)
    runtime     the model as an ONNX Runtime session                            (bundle, monitoring)
    agent       the embeddable Agent                                            (bundle, monitoring, uplink, runtime)
    http        serving over HTTP                                               (agent, runtime)
    deploy      bundles that arrive over the network                            (agent, bundle, runtime, uplink)
    capture     sampled inputs spooled and uploaded to the fleet                (agent, uplink)
    batch, settings, cli, __main__ and the package's front door on top

Like tests/edge_kit/test_layout.py this reads the source, every import statement including the ones
inside functions and under TYPE_CHECKING, so a lazy upward import fails here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.imports import imported_modules, module_name

REPO = Path(__file__).resolve().parents[2]
KERNEL = {"errors", "atomic", "host", "strict_toml", "settings_schema", "cli_runner", "durable_sqlite"}
ROLES = {"bundle", "uplink", "monitoring", "http", "deploy", "capture"}
TOP = {"runtime", "agent", "batch", "settings", "cli", "__main__", "__init__"}

# area -> the areas it may import from, besides itself and the kernel
ALLOWED: dict[str, set[str]] = {
    "kernel": set(),
    "bundle": set(),
    "uplink": set(),
    "monitoring": {"bundle"},
    "runtime": {"bundle", "monitoring"},
    "agent": {"bundle", "monitoring", "uplink", "runtime"},
    "http": {"agent", "runtime"},
    "deploy": {"agent", "bundle", "runtime", "uplink"},
    "capture": {"agent", "uplink"},
    "batch": {"runtime", "bundle"},
    "settings": {"bundle", "http", "uplink", "monitoring", "deploy", "capture"},
    "cli": {"agent", "batch", "bundle", "capture", "deploy", "http", "monitoring", "runtime", "settings", "uplink"},
    "__main__": {"cli"},
    "__init__": {"agent"},  # the lazy front door: `from device_agent import Agent`
}

# Single modules, not areas, that a lower layer may import, each with the reason it is not a back edge.
EXCEPTIONS: dict[str, dict[str, str]] = {
    "agent": {"device_agent.deploy.serving": "ServingStats imports nothing of device_agent (canary figures "
                                             "that the agent records per request)"},
}

EXPECTED_MODULES = {
    "bundle": {"format", "signing", "versions", "selection", "watcher"},
    "http": {"server", "protocol", "routes", "oip", "jsonio"},
    "monitoring": {"summary", "window", "reference", "channels", "dispersion"},
    "uplink": {"connection", "transport", "forwarder", "spool", "wire"},
}


def area_of(module: str) -> str:
    """The area of a dotted module name under device_agent."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if parts[1] in KERNEL:
        return "kernel"
    return parts[1]


def upward_imports(module: str, imports: list[tuple[int, str]]) -> list[str]:
    here = area_of(module)
    allowed = ALLOWED[here] | {here, "kernel"}
    excused = EXCEPTIONS.get(here, {})
    return [f"line {line}: {name} ({area_of(name)})" for line, name in imports
            if name.startswith("device_agent.") and area_of(name) not in allowed and name not in excused]


SOURCES = sorted((REPO / "device_agent").rglob("*.py"))


def test_every_role_folder_holds_its_modules_and_every_loose_module_has_a_layer() -> None:
    for folder, modules in EXPECTED_MODULES.items():
        present = {p.stem for p in (REPO / "device_agent" / folder).glob("*.py")}
        assert modules <= present, f"device_agent/{folder} lacks {sorted(modules - present)}"
    loose = {p.stem for p in (REPO / "device_agent").glob("*.py")}
    assert loose <= KERNEL | TOP, f"place {sorted(loose - KERNEL - TOP)} in KERNEL or TOP (or a role folder)"
    folders = {p.parent.name for p in (REPO / "device_agent").glob("*/__init__.py")}
    assert folders <= ROLES, f"give {sorted(folders - ROLES)} a row in ALLOWED"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down_the_layers(path: Path) -> None:
    imports = imported_modules(path)
    relative = [name for _, name in imports if name.startswith(".")]
    assert not relative, f"{path.relative_to(REPO)}: absolute imports only, so this check sees them: {relative}"
    upward = upward_imports(module_name(path), imports)
    assert not upward, f"{path.relative_to(REPO)} ({area_of(module_name(path))}) imports upward: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_device_side_never_imports_the_server(path: Path) -> None:
    server = {"edge_kit", "calibration", "torch", "mlflow", "dvc", "scipy", "neural_compressor", "harness", "tests"}
    bad = [name for _, name in imported_modules(path) if name.split(".")[0] in server]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_exceptions_are_still_needed_and_still_leaves() -> None:
    for area, modules in EXCEPTIONS.items():
        for module in modules:
            path = REPO / (module.replace(".", "/") + ".py")
            own = [name for _, name in imported_modules(path) if name.startswith("device_agent")]
            assert not own, f"{module} is excused as a leaf but imports {own}"
            users = [p for p in SOURCES if area_of(module_name(p)) == area
                     and any(name == module for _, name in imported_modules(p))]
            assert users, f"{module} is excused for {area} but nothing there imports it: drop the exception"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: a lazy import of the agent planted in the bundle package, or of a role
    package in the kernel, is flagged."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from device_agent.agent import Agent\n    import device_agent.uplink.spool\n")
    imports = imported_modules(planted)
    assert [name for _, name in imports] == ["device_agent.agent", "device_agent.uplink.spool"]
    assert len(upward_imports("device_agent.bundle.planted", imports)) == 2
    assert len(upward_imports("device_agent.errors", imports)) == 2
    assert upward_imports("device_agent.cli", imports) == []
