"""Every third-party module the project imports is declared in pyproject.toml, not merely installed as
someone else's dependency (which a new release of that package may drop); the agent's only in the base
install, which is all a device gets.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"edge_kit", "device_agent", "calibration", "harness", "tests", "benchmarks", "scripts", "__future__"}
# folder -> the dependency groups of pyproject.toml its imports may come from (None: any group)
CODE: dict[str, set[str] | None] = {"device_agent": {"base"}, "calibration": None, "edge_kit": None,
                                    "harness": None, "scripts": None}


def normalized(requirement: str) -> str:
    """The PEP 503 name of a requirement string: `psycopg[binary]>=3.1` -> `psycopg`."""
    name = re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """Dependency group ("base" or the extra's name) -> the distributions it declares."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"base": {normalized(r) for r in project["dependencies"]}}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        groups[extra] = {normalized(r) for r in requirements}
    return groups


def third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level module -> `file:line` of its first import, for modules neither ours nor stdlib.

    An import inside `try: ... except ImportError` is optional by construction (the code runs without
    it, e.g. orjson on a device) and is not counted.
    """
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _catches_import_error(t)
                    for stmt in t.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in OURS and top not in sys.stdlib_module_names:
                    found.setdefault(top, f"{path.relative_to(folder.parent)}:{node.lineno}")
    return found


def _catches_import_error(node: ast.Try) -> bool:
    names = {n.id for h in node.handlers if h.type is not None for n in ast.walk(h.type) if isinstance(n, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


@cache
def installed() -> dict[str, list[str]]:
    return dict(packages_distributions())  # top-level module -> the distributions that install it


@pytest.mark.parametrize("folder", sorted(CODE))
def test_every_imported_package_is_declared(folder: str) -> None:
    groups = declared()
    allowed = set().union(*(groups[g] for g in (CODE[folder] or groups)))
    distributions = installed()
    missing = []
    for module, where in sorted(third_party_imports(REPO / folder).items()):
        names = {normalized(d) for d in distributions.get(module, [])}
        if not names & allowed:
            missing.append(f"{module} ({where}; distribution {sorted(names) or 'not installed'})")
    groups_named = "the base dependencies" if CODE[folder] == {"base"} else "pyproject.toml"
    assert not missing, f"{folder} imports packages not declared in {groups_named}: {missing}"


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("import json\nimport numpy as np\nfrom yaml import safe_load\n"
                                   "from edge_kit.config import Config\n\ndef f():\n    import jsonschema\n"
                                   "try:\n    import orjson\nexcept ImportError:\n    orjson = None\n")
    assert third_party_imports(tmp_path) == {"jsonschema": f"{tmp_path.name}/m.py:7",
                                             "numpy": f"{tmp_path.name}/m.py:2", "yaml": f"{tmp_path.name}/m.py:3"}
    assert normalized("psycopg[binary]>=3.1") == "psycopg" and normalized("ray[train,data]==2.60.0") == "ray"
    assert normalized("py_cpuinfo") == "py-cpuinfo"
