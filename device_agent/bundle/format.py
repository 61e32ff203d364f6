"""The device bundle (`<name>-<version>.edgebundle`, docs/architecture.md section 5): write, read, verify.

This module is the one definition of the format: the build server writes bundles through
`write_bundle` and the agent reads them through `read_bundle`, so the two cannot drift apart.

A bundle is a zip archive. `manifest.json` lists the sha256 of the model and of every other
member; `manifest.sig` is an Ed25519 signature over the exact bytes of `manifest.json`. So one
signature covers everything, and verification is: signature, then every hash, then no unlisted
members. Archives are written deterministically (fixed timestamps, sorted members) and atomically
(temp file, fsync, rename): a reader never sees a half-written bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.atomic import atomic_write_bytes
from device_agent.bundle.signing import check_signature_settings, public_key_fingerprint, sign, signature_valid
from device_agent.errors import UsageError, VerificationError

__all__ = [
    "LEGACY_MEMBER_BYTES", "MANIFEST", "MAX_BUNDLE_BYTES", "MAX_CENTRAL_DIRECTORY_BYTES", "MAX_ENTRIES",
    "MAX_MANIFEST_BYTES", "MAX_SIGNATURE_BYTES", "MODEL", "REFERENCE", "REPORT", "SCHEMA", "SELFTEST", "SIGNATURE",
    "SUFFIX", "Bundle", "bundle_filename", "canonical_json", "parse_manifest", "read_bundle", "read_manifest",
    "sha256_hex", "write_bundle",
]

SCHEMA = "edgekit.bundle/1"
SUFFIX = ".edgebundle"
MODEL = "model.onnx"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
REFERENCE = "reference.json"
REPORT = "report.md"
# A few raw inputs with the outputs the bundled model gave for them at build time: the agent runs
# them before it swaps a new bundle in (self-test), so a bundle that loads but computes garbage on
# this device is refused.
SELFTEST = "selftest.npz"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# Limits for reading an untrusted archive (a stray file in a watched folder is untrusted until its
# signature checked out): the manifest and signature are read first under small caps, every other
# member only within the size the signed manifest states, all of it under one total budget, so a
# zip bomb costs the reader at most the budget, never the device.
MAX_MANIFEST_BYTES = 1024**2
MAX_SIGNATURE_BYTES = 4096  # an Ed25519 signature is 64 bytes
MAX_BUNDLE_BYTES = 1024**3  # all members together, decompressed
# Old manifests (no `sizes`) state no member sizes: each member is capped at this instead.
LEGACY_MEMBER_BYTES = 256 * 1024**2
MAX_ENTRIES = 64  # a bundle has about six members; a central directory of millions would be a bomb
MAX_CENTRAL_DIRECTORY_BYTES = 1024**2
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_ENCRYPTED_FLAGS = 0x1 | 0x40  # traditional and strong encryption
_CHUNK = 1024**2


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_filename(name: str, version: str) -> str:
    return f"{name}-{version}{SUFFIX}"


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed verification. `signed_by` is the key fingerprint, or None if unsigned."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]
    signed: bool
    signed_by: str | None

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def model_bytes(self) -> bytes:
        return self.members[MODEL]

    @property
    def model_sha256(self) -> str:
        return str(self.manifest["model"]["sha256"])

    @property
    def reference(self) -> dict[str, Any]:
        return dict(json.loads(self.members[REFERENCE])) if REFERENCE in self.members else {}


def canonical_json(obj: Any) -> bytes:
    """The exact bytes written for JSON members: sorted keys, so equal content gives equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_bundle(
    out_dir: str | Path,
    manifest: dict[str, Any],
    members: dict[str, bytes],
    *,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write a bundle atomically and return its path.

    `members` must hold `model.onnx` and may hold any other files (reference.json, report.md,
    selftest.npz, ...). The manifest's `schema`, `model.path`, `model.sha256` and `files` are filled
    in here from the actual bytes, so a caller cannot get them wrong.
    """
    if MODEL not in members:
        raise ValueError(f"a bundle needs {MODEL}")
    for reserved in (MANIFEST, SIGNATURE):
        if reserved in members:
            raise ValueError(f"{reserved} is written by write_bundle itself")
    for key in ("name", "version"):
        if not manifest.get(key):
            raise ValueError(f"manifest needs '{key}'")
    manifest = json.loads(json.dumps(manifest))  # a deep copy we may fill in
    manifest["schema"] = SCHEMA
    model_meta = manifest.setdefault("model", {})
    model_meta["path"] = MODEL
    model_meta["sha256"] = sha256_hex(members[MODEL])
    manifest["files"] = {name: sha256_hex(data) for name, data in sorted(members.items()) if name != MODEL}
    # Signed sizes let the reader refuse an oversized member before decompressing it.
    manifest["sizes"] = {name: len(data) for name, data in sorted(members.items())}
    manifest_bytes = canonical_json(manifest)

    entries = dict(members)
    entries[MANIFEST] = manifest_bytes
    if signing_key is not None:
        entries[SIGNATURE] = sign(signing_key, manifest_bytes)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / bundle_filename(str(manifest["name"]), str(manifest["version"]))
    # 0644: the service user that runs the agent must be able to read what the build user wrote.
    atomic_write_bytes(target, _zip_bytes(entries), mode=0o644)
    return target


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        # The manifest goes first so `unzip -l` shows it on top; the rest sorted, for stable bytes.
        order = [MANIFEST, *sorted(n for n in entries if n != MANIFEST)]
        for name in order:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, entries[name], compresslevel=6)
    return buf.getvalue()


def read_bundle(
    path: str | Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    require_signature: bool = False,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> Bundle:
    """Open and verify a bundle; raises VerificationError (exit 4) naming the failing member.

    With `public_key`, the bundle must carry a signature made by that key. Without one, the hashes
    are still checked (a corrupt bundle never loads); `require_signature` needs `public_key`
    (UsageError without one: a signature that nothing checks proves nothing).
    The manifest and signature are read and checked before any other member is decompressed, and
    every failure of the archive itself (encrypted, unsupported compression, truncated, oversized)
    is a VerificationError too, so a caller that skips bad candidates never sees anything else.
    """
    bundle_path = _bundle_file(path, public_key, require_signature)
    try:
        with _open_archive(bundle_path) as zf:
            infos = _index(zf)
            manifest_bytes, signature, signed_by = _read_verified_manifest(
                zf, infos, public_key=public_key)
            manifest = parse_manifest(manifest_bytes)
            members = _read_listed_members(zf, infos, manifest, max_bytes)
    except VerificationError as exc:
        raise _in_file(exc, bundle_path) from exc
    members[MANIFEST] = manifest_bytes
    if signature is not None:
        members[SIGNATURE] = signature
    return Bundle(bundle_path, manifest, members, signature is not None, signed_by)


def _bundle_file(path: str | Path, public_key: Ed25519PublicKey | None, require_signature: bool) -> Path:
    """The bundle's path once the signature settings make sense and the file exists (exit 2 otherwise)."""
    check_signature_settings(public_key, require_signature)
    bundle_path = Path(path)
    if not bundle_path.is_file():
        raise UsageError(f"bundle not found: {bundle_path}")
    return bundle_path


def read_manifest(
    path: str | Path, *, public_key: Ed25519PublicKey | None = None, require_signature: bool = False
) -> tuple[dict[str, Any], str | None]:
    """The manifest (signature checked as in `read_bundle`) and the signer, without reading the other
    members: cheap enough to rank the candidates of a folder by version."""
    bundle_path = _bundle_file(path, public_key, require_signature)
    try:
        with _open_archive(bundle_path) as zf:
            infos = _index(zf)
            manifest_bytes, _, signed_by = _read_verified_manifest(
                zf, infos, public_key=public_key)
            return parse_manifest(manifest_bytes), signed_by
    except VerificationError as exc:
        raise _in_file(exc, bundle_path) from exc


def _in_file(exc: VerificationError, path: Path) -> VerificationError:
    """The same error naming the file too: a watched folder holds several candidates."""
    text = exc.message.removeprefix(f"{exc.member}: ")
    return VerificationError(exc.member, f"{text} (in {path.name})", hint=exc.hint)


# What the zip layer raises on hostile input: zipfile lets struct, zlib, unicode and plain
# RuntimeError/NotImplementedError (encrypted, unknown method) escape, so all of them become one
# VerificationError here instead of an exit 1 somewhere up the stack.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
                   NotImplementedError, RuntimeError, struct.error, LookupError, OverflowError, UnicodeError)


class _Archive:
    """A ZipFile whose every archive-level exception is a VerificationError naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zf: zipfile.ZipFile | None = None

    def __enter__(self) -> zipfile.ZipFile:
        try:
            _check_central_directory(self.path)
            self.zf = zipfile.ZipFile(self.path)
        except _ARCHIVE_ERRORS as exc:
            raise VerificationError(self.path.name, f"not a readable bundle archive (truncated or corrupt): {exc}"
                                    ) from exc
        return self.zf

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.zf is not None:
            self.zf.close()
        if exc is not None and isinstance(exc, _ARCHIVE_ERRORS):
            raise VerificationError(self.path.name, f"not a readable bundle archive: {exc!r}") from exc


def _open_archive(path: Path) -> _Archive:
    return _Archive(path)


def _check_central_directory(path: Path) -> None:
    """Refuse a central directory with too many entries before zipfile parses it into memory (it
    makes one ZipInfo per entry, so a 1 GB file of empty entries would cost gigabytes)."""
    with path.open("rb") as f:
        # zipfile's own end-of-central-directory finder; private but unchanged since Python 2.
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
    if end is None:
        raise VerificationError(path.name, "not a readable bundle archive (truncated or corrupt): "
                                           "no end of central directory record")
    entries, size = int(end[zipfile._ECD_ENTRIES_TOTAL]), int(end[zipfile._ECD_SIZE])  # type: ignore[attr-defined]
    if entries > MAX_ENTRIES:
        raise VerificationError(path.name, f"archive lists {entries} entries, a bundle has at most {MAX_ENTRIES}")
    if size > MAX_CENTRAL_DIRECTORY_BYTES:
        raise VerificationError(path.name, f"central directory is {size} bytes, over {MAX_CENTRAL_DIRECTORY_BYTES}")


def _index(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Every entry by name, refusing duplicates, encryption and compression other than stored/deflate."""
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename
        if name in infos:
            raise VerificationError(name, "member appears twice in the archive")
        if info.flag_bits & _ENCRYPTED_FLAGS:
            raise VerificationError(name, "member is encrypted; bundles are never encrypted")
        if info.compress_type not in _METHODS:
            raise VerificationError(name, f"compression method {info.compress_type} is not allowed "
                                          f"(only {' and '.join(_METHODS.values())})")
        infos[name] = info
    return infos


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str) -> tuple[bytes, str]:
    """A member's bytes and sha256, decompressing at most `limit` + 1 bytes whatever its header says."""
    if info.file_size > limit:
        raise VerificationError(info.filename, f"member is {info.file_size} bytes, over {what} ({limit})")
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    total = 0
    with zf.open(info) as f:
        while True:
            chunk = f.read(min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise VerificationError(info.filename, f"member decompresses past {what} ({limit} bytes)")
            digest.update(chunk)
            chunks.append(chunk)
    return b"".join(chunks), digest.hexdigest()


def _read_verified_manifest(
    zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], *, public_key: Ed25519PublicKey | None,
) -> tuple[bytes, bytes | None, str | None]:
    if MANIFEST not in infos:
        raise VerificationError(MANIFEST, "missing from the bundle")
    manifest_bytes, _ = _read_capped(zf, infos[MANIFEST], MAX_MANIFEST_BYTES, "the manifest size limit")
    signature = None
    if SIGNATURE in infos:
        signature, _ = _read_capped(zf, infos[SIGNATURE], MAX_SIGNATURE_BYTES, "the signature size limit")
    signed_by = None
    if public_key is not None:
        if signature is None:
            raise VerificationError(SIGNATURE, "bundle is unsigned but a public key was given")
        if not signature_valid(public_key, signature, manifest_bytes):
            raise VerificationError(
                SIGNATURE, "signature does not match manifest.json (tampered manifest or wrong public key)"
            )
        signed_by = public_key_fingerprint(public_key)
    return manifest_bytes, signature, signed_by


def parse_manifest(manifest_bytes: bytes) -> dict[str, Any]:
    """The manifest as a dict, with the fields every reader relies on checked (VerificationError if not)."""
    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise VerificationError(MANIFEST, f"not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise VerificationError(MANIFEST, f"schema is {found!r}, this reader understands {SCHEMA!r}")
    for key in ("name", "version"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise VerificationError(MANIFEST, f"'{key}' must be a non-empty string")
    _expected_sizes(manifest, _expected_hashes(manifest))
    return manifest


def _read_listed_members(
    zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], manifest: dict[str, Any], max_bytes: int
) -> dict[str, bytes]:
    expected = _expected_hashes(manifest)
    sizes = _expected_sizes(manifest, expected)
    for name in infos:
        if name not in expected and name not in (MANIFEST, SIGNATURE):
            raise VerificationError(name, "member is not listed in the manifest (added after signing?)")
    for name in expected:
        if name not in infos:
            raise VerificationError(name, "listed in the manifest but missing from the bundle (truncated?)")
    limits = {name: sizes.get(name, LEGACY_MEMBER_BYTES) for name in expected}
    budget = max_bytes
    members: dict[str, bytes] = {}
    for name, digest in expected.items():
        limit = min(limits[name], budget)
        data, actual = _read_capped(zf, infos[name], limit,
                                    "the size the manifest states" if name in sizes else "the per-member limit")
        if name in sizes and len(data) != sizes[name]:
            raise VerificationError(name, f"is {len(data)} bytes, the manifest states {sizes[name]} (truncated?)")
        if actual != digest:
            raise VerificationError(name, "sha256 does not match the manifest (tampered or corrupt)")
        budget -= len(data)
        members[name] = data
    return members


def _expected_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    try:
        model = manifest["model"]
        expected = {str(model["path"]): str(model["sha256"])}
        files = manifest.get("files", {})
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
        expected.update({str(k): str(v) for k, v in files.items()})
    except (KeyError, TypeError) as exc:
        raise VerificationError(MANIFEST, f"malformed model/files entries: {exc}") from exc
    if expected.get(MODEL) is None:
        raise VerificationError(MANIFEST, f"model.path must be {MODEL}")
    for name in (MANIFEST, SIGNATURE):
        if name in expected:
            raise VerificationError(MANIFEST, f"{name} cannot be listed as a member")
    return expected


def _expected_sizes(manifest: dict[str, Any], expected: dict[str, str]) -> dict[str, int]:
    """Member sizes the manifest states ({} for an old manifest without `sizes`)."""
    sizes = manifest.get("sizes")
    if sizes is None:
        return {}
    if not isinstance(sizes, dict):
        raise VerificationError(MANIFEST, "'sizes' must be an object of member -> bytes")
    for name, size in sizes.items():
        if name not in expected:
            raise VerificationError(MANIFEST, f"'sizes' names {name!r}, which has no hash in the manifest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise VerificationError(MANIFEST, f"'sizes.{name}' must be a non-negative integer")
    missing = sorted(set(expected) - set(sizes))
    if missing:
        raise VerificationError(MANIFEST, f"'sizes' has no entry for {missing[0]!r}")
    return dict(sizes)
