"""Ordering of bundle versions, for the agent's no-downgrade rule (stdlib only: no `packaging` on a device).

A version is dotted numbers with an optional suffix: `1.2.0`, `2.0`, `1.3.0rc1`, `1.3.0-beta`. Numbers
compare numerically with missing parts as zero (`1.2` == `1.2.0`); a suffix marks a pre-release, which
sorts before the plain release and by its text among pre-releases. Anything else is not comparable
(`None`), and the agent treats "cannot tell" like "lower": refused unless downgrades are allowed.
"""

from __future__ import annotations

import re

_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(?:[-.+_]?([0-9A-Za-z.+_-]+))?")

VersionKey = tuple[tuple[int, ...], tuple[int, str]]


def version_key(version: str) -> VersionKey | None:
    """A sort key for `version`, or None if it is not a version this module can order."""
    match = _VERSION.fullmatch(version.strip()) if isinstance(version, str) else None
    if match is None:
        return None
    numbers = tuple(int(p) for p in match.group(1).split("."))
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers = numbers[:-1]
    suffix = match.group(2)
    return numbers, (1, "") if suffix is None else (0, suffix)


def is_upgrade(current: str, candidate: str) -> bool | None:
    """True if `candidate` is newer than `current`, False if equal or older, None if not comparable."""
    a, b = version_key(current), version_key(candidate)
    if a is None or b is None:
        return None
    return b > a
