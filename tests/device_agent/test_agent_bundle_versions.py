"""Bundle versions are ordered the PEP 440 way; a version outside PEP 440 cannot be ordered at all."""

from __future__ import annotations

import pytest

from device_agent.bundle.versions import is_upgrade, version_key


@pytest.mark.parametrize(("lower", "higher"), [
    ("1.9.0", "1.10.0"),
    ("1.3.0rc2", "1.3.0rc10"),  # the old hand-made order compared "rc10" < "rc2" as text
    ("1.3.0", "1.3.0.post1"),  # ... and took ".post1" for a pre-release
    ("1.3.0rc10", "1.3.0"),
    ("1.3.0.dev1", "1.3.0a1"),
    ("1.3.0b1", "1.3.0rc1"),
    ("1.0.0", "1.0.0+build.7"),  # a local version sorts after its public one
    ("0.9.9", "v1.0"),
    ("1!0.1", "2!0.0"),  # epochs outrank everything
    ("1.3.0-beta", "1.3.0"),  # pip's normalisation: -beta is b0
])
def test_pep440_order(lower: str, higher: str) -> None:
    assert is_upgrade(lower, higher) is True
    assert is_upgrade(higher, lower) is False


@pytest.mark.parametrize(("a", "b"), [("1.2", "1.2.0"), ("v1.2.0", "1.2.0"), ("1.3.0-rc.1", "1.3.0rc1")])
def test_equal_spellings_are_not_an_upgrade(a: str, b: str) -> None:
    assert version_key(a) == version_key(b)
    assert is_upgrade(a, b) is False and is_upgrade(b, a) is False


@pytest.mark.parametrize("bad", ["2024-spring", "latest", "", "1.0.0.x", "1..0"])
def test_a_version_outside_pep440_cannot_be_ordered(bad: str) -> None:
    assert version_key(bad) is None
    assert is_upgrade("1.0.0", bad) is None and is_upgrade(bad, "1.0.0") is None
