"""Hypothesis strategies and helpers shared by the config readers' property tests: TOML documents
made mostly of known sections and keys with edge values (nan, inf, NUL, huge), written as TOML text."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from device_agent.errors import UsageError

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EDGE_VALUES = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e308, 0, -1, 2**63 - 1, -(2**63), True, "", "\0",
               "npz:a\0b", "csv:\0", "/nonexistent/\0", "a" * 300,
               "npz:" + "a" * 300]
scalars = st.one_of(
    st.sampled_from(EDGE_VALUES),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["sklearn:digits", "npz:", "csv:x\0y", "npz:../../etc/passwd", "ort", "minmax", "x86-vnni",
                     "mqtt://127.0.0.1:1883", "mqtts://h:8883", "mqtt://[::1", "auto", "a:b", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (lone surrogates make invalid TOML: also a fine input)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_text(doc: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def documents(sections: dict[str, list[str]]) -> st.SearchStrategy[dict[str, dict[str, Any]]]:
    """Mostly known sections and keys (so values reach the type and range checks), some unknown ones."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
        doc: dict[str, dict[str, Any]] = {}
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.one_of(st.sampled_from(sorted(sections)), st.text(min_size=1, max_size=6)))
            keys = sections.get(name, [])
            key = st.sampled_from(keys) if keys and draw(st.integers(0, 9)) else st.text(max_size=6)
            doc[name] = draw(st.dictionaries(key, values, max_size=4))
        return doc

    return build()


def finite_numbers(obj: Any) -> bool:
    if dataclasses.is_dataclass(obj):
        return all(finite_numbers(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def load_or_refuse(loader: Any, path: Path, text: str | bytes) -> Any:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        return loader(path)
    except UsageError:  # ConfigError is a UsageError: exit 2 with the key named
        return None
