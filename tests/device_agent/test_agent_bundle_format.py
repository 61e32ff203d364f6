"""The bundle format as the agent reads it: every kind of tampering is refused, naming the member."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from device_agent.bundle.format import MANIFEST, MODEL, REFERENCE, SELFTEST, SIGNATURE, read_bundle
from device_agent.bundle.signing import generate_keypair, load_public_key
from device_agent.errors import EXIT_VERIFICATION, UsageError, VerificationError


def rewrite(src: Path, dst: Path, *, replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
            add: dict[str, bytes] | None = None) -> Path:
    """Copy a bundle archive member by member, changing some members (what an attacker would do)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = (replace or {}).get(info.filename, zin.read(info))
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def test_a_good_signed_bundle_verifies_with_its_key(bundle_v1: Path, keypair: tuple[Path, Path]) -> None:
    bundle = read_bundle(bundle_v1, public_key=load_public_key(keypair[1]))
    assert bundle.signed and bundle.signed_by is not None
    assert set(bundle.members) == {MANIFEST, SIGNATURE, MODEL, REFERENCE, SELFTEST, "report.md"}


@pytest.mark.parametrize("member", [MODEL, REFERENCE, SELFTEST])
def test_a_changed_member_is_refused_and_named(bundle_v1: Path, tmp_path: Path, member: str,
                                               keypair: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(bundle_v1) as zf:
        original = zf.read(member)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01  # one bit, in the middle
    tampered = rewrite(bundle_v1, tmp_path / "t.edgebundle", replace={member: bytes(flipped)})
    with pytest.raises(VerificationError) as err:
        read_bundle(tampered, public_key=load_public_key(keypair[1]))
    assert err.value.member == member
    assert err.value.exit_code == EXIT_VERIFICATION
    assert "sha256" in str(err.value)


def test_an_edited_manifest_breaks_the_signature(bundle_v1: Path, tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(bundle_v1) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    manifest["version"] = "9.9.9"
    tampered = rewrite(bundle_v1, tmp_path / "t.edgebundle", replace={MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(VerificationError) as err:
        read_bundle(tampered, public_key=load_public_key(keypair[1]))
    assert err.value.member == SIGNATURE


def test_the_wrong_key_and_missing_signature_are_refused(bundle_v1: Path, tmp_path: Path) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(VerificationError) as err:
        read_bundle(bundle_v1, public_key=load_public_key(other_pub))
    assert err.value.member == SIGNATURE
    unsigned = rewrite(bundle_v1, tmp_path / "u.edgebundle", drop=(SIGNATURE,))
    with pytest.raises(VerificationError) as err:
        read_bundle(unsigned, public_key=load_public_key(other_pub))
    assert err.value.member == SIGNATURE
    assert not read_bundle(unsigned).signed  # hashes alone still pass when no key is asked for


def test_added_missing_and_truncated_members_are_refused(bundle_v1: Path, tmp_path: Path) -> None:
    added = rewrite(bundle_v1, tmp_path / "a.edgebundle", add={"evil.py": b"print('hi')"})
    with pytest.raises(VerificationError) as err:
        read_bundle(added)
    assert err.value.member == "evil.py"

    missing = rewrite(bundle_v1, tmp_path / "m.edgebundle", drop=(REFERENCE,))
    with pytest.raises(VerificationError) as err:
        read_bundle(missing)
    assert err.value.member == REFERENCE

    data = bundle_v1.read_bytes()
    truncated = tmp_path / "trunc.edgebundle"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VerificationError) as err:
        read_bundle(truncated)
    assert err.value.member == truncated.name

    with pytest.raises(UsageError):
        read_bundle(tmp_path / "nope.edgebundle")
