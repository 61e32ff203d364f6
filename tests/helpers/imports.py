"""Reading a source file's imports without running it, for the layout tests of every package.

Every import statement counts, the lazy ones inside functions too (they keep `--help` fast, and an
upward one is still an upward dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path = REPO) -> str:
    """The dotted name of a source file under `root` (a package's `__init__.py` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file. `from pkg import name` also yields `pkg.name`
    when that is a module (not an attribute); a relative import is kept as written (`.`, `..x`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                         if _is_module(root, node.module, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _is_module(root: Path, package: str, name: str) -> bool:
    base = root / package.replace(".", "/") / name
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()
