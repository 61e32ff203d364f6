"""The package layout follows the pipeline: every import points the way data flows, never back up.

train -> compile -> ship is the build pipeline; fleet watches devices and needs none of it; bench,
demo and commands sit on top. `edge_kit.errors` and `edge_kit.config` are shared by every stage.
This reads the source (every import statement, including the ones inside functions that keep
`--help` fast), so a lazy upward import fails here too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.imports import imported_modules, module_name

REPO = Path(__file__).resolve().parents[2]
SHARED = {"edge_kit", "edge_kit.errors", "edge_kit.config"}

# area -> the areas it may import from (besides itself and the shared modules)
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "train": set(),
    "compile": {"train"},
    "ship": {"train", "compile"},
    "fleet": set(),
    "bench": {"train", "compile", "ship"},
    "demo": {"train", "compile", "ship", "fleet"},
    "commands": {"train", "compile", "ship", "fleet", "bench", "demo"},
    "cli": {"commands"},
}


def area_of(module: str) -> str:
    """The area of a dotted module name under edge_kit."""
    if module in SHARED or module == "edge_kit.__main__":
        return "shared" if module in SHARED else "cli"
    parts = module.split(".")
    if parts[1] == "cli":
        return "cli"
    return parts[1]


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_every_stage_folder_exists_with_its_modules() -> None:
    expected = {
        "train": {"run", "trainer", "run_record", "checkpoint", "data", "snapshot", "models", "tracking", "provenance",
                  "export"},
        "compile": {"gate", "fallback", "sqnr", "qdq_analysis", "evaluate", "search"},
        "compile/quantize": {"__init__", "ort_quantizer", "ort", "inc"},
        "ship": {"build", "package", "report", "registry", "reproduce"},
    }
    for folder, modules in expected.items():
        present = {p.stem for p in (REPO / "edge_kit" / folder).glob("*.py")}
        assert modules <= present, f"edge_kit/{folder} lacks {sorted(modules - present)}"
    loose = {p.stem for p in (REPO / "edge_kit").glob("*.py")}
    assert loose == {"__init__", "__main__", "cli", "config", "errors"}, "stage modules belong in their stage folder"


@pytest.mark.parametrize("path", sources("edge_kit"), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_pipeline(path: Path) -> None:
    here = area_of(module_name(path))
    allowed = ALLOWED[here] | {here, "shared"}
    upward = [f"line {line}: {name} ({area_of(name)})" for line, name in imported_modules(path)
              if name.startswith("edge_kit.") and area_of(name) not in allowed]
    assert not upward, f"{path.relative_to(REPO)} ({here}) imports against the pipeline: {upward}"


@pytest.mark.parametrize("path", sources("calibration"), ids=lambda p: str(p.relative_to(REPO)))
def test_calibration_never_imports_the_server(path: Path) -> None:
    bad = [name for _, name in imported_modules(path) if name.split(".")[0] == "edge_kit"]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is not vacuous: a train module importing the gate is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edge_kit.compile.gate import run_gate\n")
    names = [name for _, name in imported_modules(bad)]
    assert names == ["edge_kit.compile.gate"]
    assert area_of(names[0]) not in ALLOWED["train"] | {"train", "shared"}


@pytest.mark.parametrize("stage", ["train", "compile", "ship"])
def test_the_stage_table_names_every_module_of_the_stage(stage: str) -> None:
    """docs/architecture.md's table of the pipeline's folders lists every module in them (subpackages too)."""
    row = next(line for line in (REPO / "docs" / "architecture.md").read_text().splitlines()
               if line.startswith(f"| `edge_kit/{stage}/` |"))
    named = set(re.findall(r"`([a-z_0-9]+)(?:\.py|/)?`", row))
    modules = {p.stem if p.stem != "__init__" else p.parent.name
               for p in (REPO / "edge_kit" / stage).rglob("*.py")} - {stage}
    assert sorted(modules - named) == [], f"the {stage} row of docs/architecture.md misses these modules"
