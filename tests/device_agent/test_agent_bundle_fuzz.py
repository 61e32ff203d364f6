"""Property-based: whatever bytes sit in a watched folder, the bundle reader answers with a Bundle or a
VerificationError (exit 4), never anything else, and never reads past its budget."""

from __future__ import annotations

import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.bundle.format import MANIFEST, MODEL, REFERENCE, SIGNATURE, read_bundle
from device_agent.errors import VerificationError
from tests.helpers.hostile_zips import RawEntry, deflated_zeros, raw_zip

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = st.sampled_from([MANIFEST, SIGNATURE, MODEL, REFERENCE, "report.md", "evil.py", "../x", ""])
# stored, deflate, and methods zipfile can read (bzip2, lzma) or cannot (99 = AES, 6 = implode)
METHODS = st.sampled_from([0, 8, 12, 14, 99, 6])
FLAGS = st.sampled_from([0, 0x1, 0x8, 0x40, 0x800])


@pytest.fixture(scope="module")
def good_bytes(bundle_v1: Path) -> bytes:
    return bundle_v1.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "candidate.edgebundle"


def read_or_refuse(path: Path, data: bytes, **kw: object) -> None:
    path.write_bytes(data)
    try:
        bundle = read_bundle(path, **kw)  # type: ignore[arg-type]
    except VerificationError:
        return
    budget = int(kw.get("max_bytes", 1024**3))  # type: ignore[call-overload]
    assert sum(len(v) for k, v in bundle.members.items() if k not in (MANIFEST, SIGNATURE)) <= budget


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(scratch: Path, data: bytes) -> None:
    read_or_refuse(scratch, data)


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_a_good_bundle_with_bytes_changed_or_cut(scratch: Path, good_bytes: bytes,
                                                  edits: list[tuple[float, int]], cut: float | None) -> None:
    data = bytearray(good_bytes)
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    read_or_refuse(scratch, bytes(data))


@st.composite
def raw_entries(draw: st.DrawFn) -> RawEntry:
    name = draw(NAMES)
    method = draw(METHODS)
    if draw(st.booleans()):  # a small bomb: 1..8 MiB of zeros in a few KiB
        mib = draw(st.integers(1, 4))
        payload, crc = deflated_zeros(mib)
        method, real = zipfile.ZIP_DEFLATED, mib * 1024**2
    else:
        raw = draw(st.binary(max_size=256))
        payload = zlib.compress(raw)[2:-4] if method == zipfile.ZIP_DEFLATED else raw
        crc, real = zlib.crc32(raw), len(raw)
    declared = draw(st.one_of(st.just(real), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        crc = draw(st.integers(0, 2**32 - 1))
    return RawEntry(name, payload, method=method, flags=draw(FLAGS), crc=crc, size=declared)


@FUZZ
@given(entries=st.lists(raw_entries(), max_size=6))
def test_crafted_archives_stay_within_the_budget(scratch: Path, entries: list[RawEntry]) -> None:
    budget = 2 * 1024**2
    tracemalloc.start()
    try:
        read_or_refuse(scratch, raw_zip(entries), max_bytes=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The manifest cap (1 MiB) plus the budget plus a chunk in flight, with room for zipfile itself.
    assert peak < 8 * 1024**2
