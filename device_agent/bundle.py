"""The device bundle (`<name>-<version>.edgebundle`, DESIGN.md section 5): write, read, verify.

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
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.atomic import atomic_write_bytes
from device_agent.errors import UsageError, VerificationError
from device_agent.signing import public_key_fingerprint, sign, signature_valid

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
# Members that may be larger than this are refused before they are decompressed (zip bombs).
MAX_MEMBER_BYTES = 2 * 1024**3


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
    manifest_bytes = canonical_json(manifest)

    entries = dict(members)
    entries[MANIFEST] = manifest_bytes
    if signing_key is not None:
        entries[SIGNATURE] = sign(signing_key, manifest_bytes)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / bundle_filename(str(manifest["name"]), str(manifest["version"]))
    atomic_write_bytes(target, _zip_bytes(entries))
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
) -> Bundle:
    """Open and verify a bundle; raises VerificationError (exit 4) naming the failing member.

    With `public_key`, the bundle must carry a signature made by that key. Without one, the hashes
    are still checked (a corrupt bundle never loads), and `require_signature` refuses unsigned ones.
    """
    bundle_path = Path(path)
    if not bundle_path.is_file():
        raise UsageError(f"bundle not found: {bundle_path}")
    members = _read_members(bundle_path)

    if MANIFEST not in members:
        raise VerificationError(MANIFEST, "missing from the bundle")
    manifest_bytes = members[MANIFEST]
    signed = SIGNATURE in members
    signed_by = None
    if public_key is not None:
        if not signed:
            raise VerificationError(SIGNATURE, "bundle is unsigned but a public key was given")
        if not signature_valid(public_key, members[SIGNATURE], manifest_bytes):
            raise VerificationError(
                SIGNATURE, "signature does not match manifest.json (tampered manifest or wrong public key)"
            )
        signed_by = public_key_fingerprint(public_key)
    elif require_signature and not signed:
        raise VerificationError(SIGNATURE, "bundle is unsigned and this agent requires signed bundles")

    try:
        manifest = json.loads(manifest_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(MANIFEST, f"not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise VerificationError(MANIFEST, f"schema is {found!r}, this reader understands {SCHEMA!r}")

    expected = _expected_hashes(manifest)
    for name, digest in expected.items():
        if name not in members:
            raise VerificationError(name, "listed in the manifest but missing from the bundle (truncated?)")
        if sha256_hex(members[name]) != digest:
            raise VerificationError(name, "sha256 does not match the manifest (tampered or corrupt)")
    for name in members:
        if name not in expected and name not in (MANIFEST, SIGNATURE):
            raise VerificationError(name, "member is not listed in the manifest (added after signing?)")
    return Bundle(bundle_path, manifest, members, signed, signed_by)


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
    return expected


def _read_members(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            members: dict[str, bytes] = {}
            for info in infos:
                if info.file_size > MAX_MEMBER_BYTES:
                    raise VerificationError(info.filename, f"member is {info.file_size} bytes, over the limit")
                if info.filename in members:
                    raise VerificationError(info.filename, "member appears twice in the archive")
                try:
                    members[info.filename] = zf.read(info)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    raise VerificationError(info.filename, f"corrupt in the archive: {exc}") from exc
    except VerificationError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise VerificationError(path.name, f"not a readable bundle archive (truncated or corrupt): {exc}") from exc
    return members
