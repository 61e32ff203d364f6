"""JSON in and out of the agent's HTTP API: orjson when it is installed (optional on a device), else the stdlib.

orjson parses and writes several times faster and serialises numpy arrays directly (no `tolist()`
detour), which matters when a request costs about as much as the model. Both paths produce the same
JSON values: floats from float32 arrays round-trip to the same float32 either way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - exercised on devices without orjson
    orjson = None  # type: ignore[assignment]

# orjson.JSONDecodeError subclasses json.JSONDecodeError, so one except clause covers both.
DecodeError = json.JSONDecodeError


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON; raises DecodeError (also for nesting too deep), or UnicodeDecodeError on bad UTF-8."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # the stdlib also reads NaN/Infinity (Python's json writes them): its verdict stands
    if isinstance(data, memoryview):
        data = bytes(data)
    try:
        return json.loads(data)
    except RecursionError:  # nesting deeper than the interpreter's stack (orjson stops at 1024 levels)
        raise DecodeError("JSON nested too deeply", "", 0) from None


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; numpy arrays and scalars are written as lists and numbers."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)
    return json.dumps(obj, separators=(",", ":"), default=_default).encode()
