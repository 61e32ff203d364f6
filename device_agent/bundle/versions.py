"""Ordering of bundle versions: PEP 440, through `packaging` (installed on every device with onnxruntime).

`1.10.0` > `1.9.0`, `1.2` == `1.2.0`, `1.3.0rc2` < `1.3.0rc10` < `1.3.0` < `1.3.0.post1`, and a leading
`v` or a `-beta` spelling is normalised the way pip does it. A version that is not PEP 440
(`2024-spring`, `latest`) has no place in that order: `version_key` returns None and `is_upgrade`
says "cannot tell" (None), which the selection rule treats as "not an upgrade" (see `selection`).
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

__all__ = ["is_upgrade", "version_key"]


def version_key(version: str) -> Version | None:
    """`version` as a comparable PEP 440 `Version`, or None if it is not one."""
    if not isinstance(version, str):
        return None
    try:
        return Version(version.strip())
    except InvalidVersion:
        return None


def is_upgrade(current: str, candidate: str) -> bool | None:
    """True if `candidate` is newer than `current`, False if equal or older, None if either is not PEP 440."""
    a, b = version_key(current), version_key(candidate)
    if a is None or b is None:
        return None
    return b > a
