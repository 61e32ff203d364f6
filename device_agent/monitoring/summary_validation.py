"""Hostile-payload checks of a decoded summary document (any JSON value a client sent).

Structure and types only: every field the value needs, of the right type and range, before any of it
reaches an array, storage or a page. What depends on a model (bin edges, channel names, label classes)
is the fleet server's (`edge_kit/fleet/ingest.py`). A refusal raises `PayloadError` with a short `kind`
that the server counts. The checks are written in bulk (C-level builtins over all channels at once):
they run on the fleet server's hot path, thousands of summaries a second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.errors import PayloadError

SCHEMA = "edgekit.summary/1"
# Every integer is stored as a signed 64-bit column (SQLite INTEGER, PostgreSQL BIGINT): a larger one
# passes JSON but fails the insert, so it is refused here, where the message can still be named.
INT64_MAX = 2**63 - 1


def check_payload(p: Any) -> dict[str, Any]:
    """The document if it is a well-formed summary, else `PayloadError`."""
    return checked_counts(p)[0]


def checked_counts(p: Any) -> tuple[dict[str, Any], np.ndarray]:
    """`check_payload`, and every channel's counts concatenated in payload order (int64).

    The checks build that array anyway, so a caller that needs the counts (the fleet server's ingest)
    takes it from here instead of converting 30 x 32 Python integers a second time.
    """
    if not isinstance(p, dict):
        raise PayloadError("malformed", "payload is not a JSON object")
    if p.get("schema") != SCHEMA:
        raise PayloadError("schema", f"schema is {p.get('schema')!r}, expected {SCHEMA!r}")
    for key, typ in (("fleet", str), ("device", str), ("model", dict), ("window", dict), ("channels", dict)):
        if not isinstance(p.get(key), typ):
            raise PayloadError("malformed", f"'{key}' missing or not a {typ.__name__}")
    if not all(isinstance(p["model"].get(k), str) for k in ("name", "version", "sha256")):
        raise PayloadError("malformed", "model needs string name, version and sha256")
    w = p["window"]
    if not (_is_number(w.get("start")) and _is_number(w.get("end")) and w["end"] >= w["start"]):
        raise PayloadError("window", "window needs numeric start <= end")
    if not _is_count(w.get("seq", 0)):
        raise PayloadError("window", "window.seq must be an integer in [0, 2**63)")
    if not _is_count(p.get("n")):
        raise PayloadError("counts", "n must be an integer in [0, 2**63)")
    if not p["channels"]:
        raise PayloadError("malformed", "no channels")
    n_eff = p.get("n_eff")
    if n_eff is not None and not (_is_number(n_eff) and 0 <= n_eff <= p["n"]):
        raise PayloadError("counts", "n_eff (effective sample size) must be a number in [0, n]")
    _check_strings(p)
    counts = _channels_ok(p["channels"], p["n"])  # one bulk check; the loop below only names the culprit
    if counts is None:
        _check_channels_one_by_one(p["channels"], p["n"])
        counts = np.array(list(itertools.chain.from_iterable(c["counts"] for c in p["channels"].values())),
                          dtype=np.int64)
    _check_labels(p.get("labels"))
    return p, counts


def _check_labels(labels: Any) -> None:
    if labels is None:
        return
    if not isinstance(labels, dict) or not isinstance(labels.get("classes"), list):
        raise PayloadError("malformed", "labels needs a classes list")
    k = len(labels["classes"])
    m = labels.get("confusion")
    if not (isinstance(m, list) and len(m) == k and all(isinstance(r, list) and len(r) == k for r in m)):
        raise PayloadError("counts", f"labels.confusion must be {k}x{k}")
    if not all(_is_count(x) for r in m for x in r):
        raise PayloadError("counts", "confusion counts must be non-negative integers")
    if sum(map(sum, m)) > INT64_MAX:
        raise PayloadError("counts", "confusion counts add up to more than 2**63 - 1")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX


# The strings of a payload that reach storage or a page, and how long each may be. A table, so a
# later schema version's optional fields add a row here. Each must be valid UTF-8 (no lone
# surrogate, which `json` decodes from "\\ud800" but no database can store) and hold no NUL
# (PostgreSQL TEXT cannot).
_STRINGS: tuple[tuple[str, Callable[[dict[str, Any]], list[Any]], int], ...] = (
    ("fleet", lambda p: [p["fleet"]], 128),
    ("device", lambda p: [p["device"]], 128),
    ("model", lambda p: list(p["model"].values()), 256),
    ("channels", lambda p: list(p["channels"]), 256),
    ("labels.classes", lambda p: _label_classes(p.get("labels")), 256),
)


def _label_classes(labels: Any) -> list[Any]:
    """The classes list of labels, [] when either is malformed (`_check_labels` refuses that, by name)."""
    classes = labels.get("classes") if isinstance(labels, dict) else None
    return list(classes) if isinstance(classes, list) else []


def _check_strings(p: dict[str, Any]) -> None:
    for where, values, limit in _STRINGS:
        found = values(p)
        if not set(map(type, found)) <= {str}:
            raise PayloadError("malformed", f"{where}: names must be strings")
        if any(len(v) > limit for v in found):
            raise PayloadError("strings", f"{where}: a name is longer than {limit} characters")
        joined = "".join(found)
        if "\x00" in joined:
            raise PayloadError("strings", f"{where}: a name holds a NUL character")
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError("strings", f"{where}: a name is not valid UTF-8 ({exc.reason})") from exc


def _all_counts(values: list[Any]) -> bool:
    """`_is_count` for every element, checked in C (type set, then min): the server's hot path."""
    return set(map(type, values)) <= {int} and min(values) >= 0


def _all_numbers_or_null(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    if not set(map(type, present)) <= {int, float}:
        return False
    try:
        return all(map(math.isfinite, present))
    except OverflowError:
        return False


def _is_number(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)  # math, not numpy: this runs per value on the server's hot path
    except OverflowError:  # an int too large for a float
        return False


def _channels_ok(channels: dict[str, Any], n: int) -> np.ndarray | None:
    """The concatenated counts if every channel is well-formed, checked for all channels at once.

    Types in C (`set(map(type, ...))`: a bool is an int to numpy), values in numpy over one array.
    None means "look closer", not a verdict: `_check_channels_one_by_one` decides.
    """
    values = list(channels.values())
    if not set(map(type, values)) <= {dict}:
        return None
    lists = [c.get("counts") for c in values]
    if not set(map(type, lists)) <= {list} or not all(lists):
        return None
    flat = list(itertools.chain.from_iterable(lists))
    if not set(map(type, flat)) <= {int}:
        return None
    try:
        counts = np.array(flat, dtype=np.int64)
    except OverflowError:  # beyond int64
        return None
    if int(counts.min()) < 0 or set(map(sum, lists)) != {n}:  # Python's sums: exact, never overflow
        return None
    stats = [c.get(k) for c in values for k in ("min", "max", "sum", "sumsq")]
    if not _all_numbers_or_null(stats):
        return None
    if [v is None for v in stats[0::4]] != [v is None for v in stats[1::4]]:  # min and max come together
        return None
    return counts if _disp_ok([c["disp"] for c in values if "disp" in c]) else None


def _disp_ok(disps: list[Any]) -> bool:
    """Every optional `disp` well-formed, in bulk (a per-channel check cost 55 us per payload)."""
    if not disps:
        return True
    if set(map(type, disps)) != {list} or set(map(len, disps)) != {4}:
        return False
    flat = list(itertools.chain.from_iterable(disps))
    # Numbers (not bool, not null), df and k integers, then finite and non-negative over one array.
    if not (set(map(type, flat)) <= {int, float} and set(map(type, flat[1::2])) <= {int}):
        return False
    try:
        values = np.array(flat, dtype=np.float64)
    except OverflowError:  # an int too large for a float
        return False
    return bool(np.isfinite(values).all()) and float(values.min()) >= 0


def _check_channels_one_by_one(channels: dict[str, Any], n: int) -> None:
    for name, c in channels.items():
        if not isinstance(c, dict) or not isinstance(c.get("counts"), list) or not c["counts"]:
            raise PayloadError("malformed", f"channel {name!r} needs a non-empty counts list")
        if not _all_counts(c["counts"]):
            raise PayloadError("counts", f"channel {name!r} counts must be non-negative integers")
        if sum(c["counts"]) != n:
            raise PayloadError("counts", f"channel {name!r} counts add up to {sum(c['counts'])}, n is {n}")
        for stat in ("min", "max", "sum", "sumsq"):
            if c.get(stat) is not None and not _is_number(c[stat]):
                raise PayloadError("malformed", f"channel {name!r} {stat} must be a finite number or null")
        if (c.get("min") is None) != (c.get("max") is None):
            raise PayloadError("malformed", f"channel {name!r} has a min without a max or a max without a min")
        _check_optional(name, c)


# Optional per-channel fields: name -> (check, message). Table-driven so new fields add one line.
_OPTIONAL_CHANNEL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "disp": (lambda d: isinstance(d, list) and len(d) == 4 and all(_is_number(v) and v >= 0 for v in d)
             and _is_count(d[1]) and _is_count(d[3]), "disp must be [X, df, S, k], non-negative, df and k integers"),
}


def _check_optional(name: str, c: dict[str, Any]) -> None:
    for key, (ok, message) in _OPTIONAL_CHANNEL_FIELDS.items():
        if key in c and not ok(c[key]):
            raise PayloadError("malformed", f"channel {name!r} {message}")
