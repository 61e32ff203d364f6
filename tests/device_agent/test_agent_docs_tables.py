"""The tables and drawings the docs keep by hand stay complete: a module, package or error added to the
code without its line in the docs fails here, and so does a line naming something that no longer exists.

Read statically (ast, no imports), so the server-side packages are checked without importing torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import device_agent.errors

ROOT = Path(__file__).resolve().parents[2]
CODE = ("device_agent", "edge_kit", "calibration")


def section(page: str, heading: str) -> str:
    """The text of `page` from `heading` to the next heading of the same or a higher level."""
    text = (ROOT / "docs" / page).read_text()
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    ends = [m.start() for m in re.finditer(rf"\n#{{1,{len(level)}}} ", text) if m.start() > start]
    return text[start:ends[0] if ends else len(text)]


def first_column(table_text: str) -> set[str]:
    """Backticked names in the first column of the markdown table rows (bold folder rows included)."""
    rows = [line.split(" | ")[0] for line in table_text.splitlines() if line.startswith("| ")]
    return {name for cell in rows for name in re.findall(r"`([^`]+)`", cell)}


def test_agent_module_table_lists_every_module_and_nothing_else() -> None:
    listed = first_column(section("agent.md", "## Modules"))
    package = ROOT / "device_agent"
    wanted = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.name == "__init__.py" and rel.parent != Path("."):
            wanted.add(f"{rel.parent.as_posix()}/")  # a subpackage is its folder's row
        else:
            wanted.add(rel.as_posix())
    assert not wanted - listed, f"docs/agent.md 'Modules' misses {sorted(wanted - listed)}"
    assert not listed - wanted, f"docs/agent.md 'Modules' names what does not exist: {sorted(listed - wanted)}"


def test_architecture_folder_table_lists_every_package() -> None:
    listed = first_column(section("architecture.md", "### Where each stage lives"))
    for top in ("edge_kit", "device_agent"):
        for init in (ROOT / top).glob("*/__init__.py"):
            folder = f"{top}/{init.parent.name}/"
            assert folder in listed, f"docs/architecture.md 'Where each stage lives' misses {folder}"
    for item in listed:
        assert (ROOT / item).exists(), f"docs/architecture.md names {item}, which does not exist"


def error_classes() -> dict[str, tuple[str, int]]:
    """Every subclass of EdgeKitError in the code: name -> (its EdgeKitError parent, its exit code)."""
    classes: dict[str, tuple[list[str], ast.expr | None]] = {}
    for top in CODE:
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                             if isinstance(b, ast.Name | ast.Attribute)]
                    code = next((stmt.value for stmt in node.body if isinstance(stmt, ast.Assign)
                                 and any(isinstance(t, ast.Name) and t.id == "exit_code" for t in stmt.targets)),
                                None)
                    classes[node.name] = (bases, code)
    found: dict[str, tuple[str, int]] = {"EdgeKitError": ("", device_agent.errors.EXIT_UNEXPECTED)}
    grew = True
    while grew:
        grew = False
        for name, (bases, code) in classes.items():
            parent = next((b for b in bases if b in found), None)
            if name in found or parent is None:
                continue
            if code is None:
                exit_code = found[parent][1]
            elif isinstance(code, ast.Name):
                exit_code = getattr(device_agent.errors, code.id)
            else:
                exit_code = ast.literal_eval(code)
            found[name] = (parent, int(exit_code))
            grew = True
    return found


def drawn_tree() -> dict[str, tuple[str, int]]:
    """The drawing in device_agent/errors.py's docstring: name -> (parent, exit code)."""
    drawn: dict[str, tuple[str, int]] = {}
    parents: list[str] = []
    doc = device_agent.errors.__doc__ or ""
    for line in doc.splitlines():
        m = re.match(r"^ {4}((?:[│ ] {3})*(?:[├└]── )?)(\w+) \((\d+)\)", line)
        if m is None:
            continue
        depth = len(m.group(1)) // 4
        parents[depth:] = [m.group(2)]
        drawn[m.group(2)] = (parents[depth - 1] if depth else "", int(m.group(3)))
    return drawn


def test_the_error_tree_drawing_is_the_code() -> None:
    found, drawn = error_classes(), drawn_tree()
    assert len(found) > 15  # the walk found the tree, not just the root
    assert not found.keys() - drawn.keys(), f"errors.py's drawing misses {sorted(found.keys() - drawn.keys())}"
    assert not drawn.keys() - found.keys(), f"errors.py draws classes that do not exist: {drawn.keys() - found.keys()}"
    for name, (parent, code) in found.items():
        assert drawn[name] == (parent, code), f"{name}: drawn as {drawn[name]}, defined as {(parent, code)}"


def test_the_drawing_reader_sees_depth_and_codes() -> None:
    drawn = drawn_tree()
    assert drawn["EdgeKitError"] == ("", 1)
    assert drawn["CalibrationError"] == ("DataError", 2) and drawn["DataError"] == ("UsageError", 2)
    assert drawn["GateFailedError"] == ("EdgeKitError", 3) and drawn["TrainingInterrupted"][1] == 75


def test_every_page_the_code_and_docs_cite_exists() -> None:
    """A file that cites `docs/<page>.md`, an upper-case page at the root, or links a page, names one that exists."""
    files = [p for top in (*CODE, "harness", "benchmarks", "tests") for p in (ROOT / top).rglob("*.py")]
    files += [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "Makefile"]
    missing = []
    for path in files:
        text = path.read_text(errors="replace")
        cited = [ROOT / m for m in re.findall(r"(?<![\w/.-])(docs/[\w-]+\.md)", text)]
        cited += [ROOT / m for m in re.findall(r"(?<![\w/.-])([A-Z][A-Z_-]*\.md)\b", text)]
        if path.suffix == ".md":
            cited += [path.parent / m for m in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", text)]
        missing += [f"{path.relative_to(ROOT)}: {c.relative_to(ROOT)}" for c in cited if not c.exists()]
    assert not missing, missing
