"""Stray and hostile files as the bundle reader sees them: every one is a VerificationError naming the
file and the member, read within the signed sizes and a total budget, never a crash or a memory spike."""

from __future__ import annotations

import json
import os
import stat
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import device_agent.bundle.format as bundle_mod
from device_agent.bundle.format import MANIFEST, MODEL, SIGNATURE, canonical_json, read_bundle
from device_agent.bundle.signing import load_public_key, sign
from device_agent.errors import EXIT_VERIFICATION, VerificationError
from tests.helpers.hostile_zips import (
    bomb_beside,
    bomb_entry,
    encrypted_zip,
    raw_zip,
    stored,
    unsupported_method_zip,
)


def manifest_of(path: Path) -> dict:  # type: ignore[type-arg]
    with zipfile.ZipFile(path) as zf:
        return dict(json.loads(zf.read(MANIFEST)))


def refused(path: Path, **kw: object) -> VerificationError:
    with pytest.raises(VerificationError) as err:
        read_bundle(path, **kw)  # type: ignore[arg-type]
    assert err.value.exit_code == EXIT_VERIFICATION
    assert path.name in str(err.value)  # names the file as well as the member
    return err.value


def resigned(good: Path, dst: Path, key: Ed25519PrivateKey, edit) -> Path:  # type: ignore[no-untyped-def]
    """The good bundle with its manifest edited by `edit` and signed again (a legitimate build)."""
    with zipfile.ZipFile(good) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    manifest = json.loads(members[MANIFEST])
    edit(manifest)
    members[MANIFEST] = canonical_json(manifest)
    members[SIGNATURE] = sign(key, members[MANIFEST])
    dst.write_bytes(raw_zip([stored(n, d) for n, d in members.items()]))
    return dst


def test_an_encrypted_member_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "enc.edgebundle"
    path.write_bytes(encrypted_zip())
    assert len(path.read_bytes()) < 200
    err = refused(path)
    assert err.member == MANIFEST and "encrypted" in str(err)


@pytest.mark.parametrize("method", [99, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_compression_method_other_than_stored_or_deflate_is_refused(tmp_path: Path, method: int) -> None:
    path = tmp_path / "m.edgebundle"
    path.write_bytes(unsupported_method_zip(method))
    err = refused(path)
    assert err.member == MANIFEST and f"compression method {method}" in str(err)


def test_a_signed_manifest_with_a_bomb_for_a_model_is_refused_before_decompressing(
        bundle_v1: Path, tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    path = tmp_path / "bomb.edgebundle"
    path.write_bytes(bomb_beside(bundle_v1, mib=600))
    assert path.stat().st_size < 1024**2
    tracemalloc.start()
    try:
        err = refused(path, public_key=load_public_key(keypair[1]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.member == MODEL and "manifest states" in str(err)
    assert peak < 16 * 1024**2


def test_a_header_that_understates_the_size_still_stops_at_the_signed_size(
        bundle_v1: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle_v1) as zf:
        entries = [stored(i.filename, zf.read(i)) for i in zf.infolist() if i.filename != MODEL]
        size = zf.getinfo(MODEL).file_size
    # The header claims the signed size; the stream holds 64 MiB: reading stops at the size, and the
    # hash (or CRC) refuses it.
    path = tmp_path / "liar.edgebundle"
    path.write_bytes(raw_zip([*entries, bomb_entry(MODEL, 64, declared=size)]))
    tracemalloc.start()
    try:
        err = refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.member in (MODEL, path.name)
    assert peak < 16 * 1024**2


def test_a_manifest_bomb_is_read_only_up_to_the_manifest_cap(tmp_path: Path) -> None:
    path = tmp_path / "mbomb.edgebundle"
    path.write_bytes(raw_zip([bomb_entry(MANIFEST, 200)]))
    tracemalloc.start()
    try:
        err = refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.member == MANIFEST
    assert peak < 16 * 1024**2


def test_an_unlisted_member_is_refused_before_it_is_read(bundle_v1: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(bundle_v1) as zf:
        entries = [stored(i.filename, zf.read(i)) for i in zf.infolist()]
    path = tmp_path / "extra.edgebundle"
    path.write_bytes(raw_zip([*entries, bomb_entry("extra.bin", 300)]))
    tracemalloc.start()
    try:
        err = refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.member == "extra.bin" and "not listed" in str(err)
    assert peak < 16 * 1024**2


def test_the_manifest_states_every_member_size_and_a_wrong_size_is_refused(
        bundle_v1: Path, tmp_path: Path, signing_key: Ed25519PrivateKey, keypair: tuple[Path, Path]) -> None:
    manifest = manifest_of(bundle_v1)
    with zipfile.ZipFile(bundle_v1) as zf:
        actual = {i.filename: i.file_size for i in zf.infolist() if i.filename not in (MANIFEST, SIGNATURE)}
    assert manifest["sizes"] == actual

    def shrink(m: dict) -> None:  # type: ignore[type-arg]
        m["sizes"][MODEL] -= 1

    err = refused(resigned(bundle_v1, tmp_path / "s.edgebundle", signing_key, shrink),
                  public_key=load_public_key(keypair[1]))
    assert err.member == MODEL


def test_an_old_manifest_without_sizes_still_reads_under_the_per_member_cap(
        bundle_v1: Path, tmp_path: Path, signing_key: Ed25519PrivateKey, keypair: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    old = resigned(bundle_v1, tmp_path / "old.edgebundle", signing_key, lambda m: m.pop("sizes"))
    key = load_public_key(keypair[1])
    assert read_bundle(old, public_key=key).model_bytes == read_bundle(bundle_v1).model_bytes
    monkeypatch.setattr(bundle_mod, "LEGACY_MEMBER_BYTES", 1024)
    assert refused(old, public_key=key).member == MODEL


def test_the_total_budget_covers_all_members_together(bundle_v1: Path) -> None:
    total = sum(manifest_of(bundle_v1)["sizes"].values())
    assert read_bundle(bundle_v1, max_bytes=total).members
    err = refused(bundle_v1, max_bytes=total - 1)
    assert "limit" in str(err) or "states" in str(err)


@pytest.mark.parametrize("data", [b"", b"PK\x05\x06" + b"\0" * 18, b"PK\x03\x04garbage", os.urandom(512)])
def test_garbage_is_a_verification_error_naming_the_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "g.edgebundle"
    path.write_bytes(data)
    refused(path)


def test_too_many_entries_are_refused_before_zipfile_indexes_them(tmp_path: Path) -> None:
    path = tmp_path / "many.edgebundle"
    path.write_bytes(raw_zip([stored(f"f{i}", b"") for i in range(bundle_mod.MAX_ENTRIES + 1)]))
    assert "entries" in str(refused(path))


def test_bundles_are_written_world_readable_keys_are_not(bundle_v1: Path, keypair: tuple[Path, Path]) -> None:
    assert stat.S_IMODE(bundle_v1.stat().st_mode) == 0o644
    assert stat.S_IMODE(keypair[0].stat().st_mode) == 0o600
