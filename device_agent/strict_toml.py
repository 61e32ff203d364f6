"""Strict TOML configs mapped onto frozen dataclasses, shared by every config edge-kit reads.

An unknown section or key is an error naming the dotted key (exit 2), never ignored: a misspelt
threshold silently left at its default is the kind of mistake nobody notices until an incident.
Lives in device_agent (stdlib only) so the agent's settings use it too.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError, UsageError

# (dotted key, value, the field's annotation as a string) -> the checked value
Coerce = Callable[[str, Any, str], Any]

_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from exc


def check_sections(raw: dict[str, Any], allowed: Iterable[str]) -> None:
    names = list(allowed)
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(unknown[0], "unknown section", hint=f"allowed: {', '.join(names)}")


def section_values(name: str, cls: type, table: Any, coerce: Coerce | None = None,
                   *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Checked keyword arguments for dataclass `cls` from one TOML table (fields in `skip` are not keys)."""
    if not isinstance(table, dict):
        raise ConfigError(name, f"must be a table, got {type(table).__name__}")
    skipped = set(skip)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skipped}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", "unknown key", hint=f"allowed: {', '.join(fields)}")
    check = coerce or check_value
    return {key: check(f"{name}.{key}", value, str(fields[key].type)) for key, value in table.items()}


def check_value(key: str, value: Any, annotation: str) -> Any:
    """Check `value` against a simple annotation (str, int, float, bool, X | None, dict[...], list[str])."""
    spec = annotation.replace(" ", "")
    optional = spec.endswith("|None")
    base = spec.removesuffix("|None")
    if optional and value is None:
        return None
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {type(value).__name__}")
        return dict(value)
    if base == "list[str]":
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(key, "must be a list of strings")
        return list(value)
    expected = _TYPES.get(base)
    if expected is None:
        raise TypeError(f"{key}: annotation {annotation!r} is not supported by strict_toml")
    if expected is not bool and isinstance(value, bool):
        raise ConfigError(key, f"must be {base}, got a boolean")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise ConfigError(key, f"must be {base}, got {type(value).__name__} {value!r}")
    # TOML allows nan and inf; no setting means either (every comparison with nan is False, so a
    # range check would let it through).
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(key, "must not contain a NUL character")
    return value
