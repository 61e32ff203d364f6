"""The bundle files the fleet serves to devices, found by the sha256 of the whole file.

Bundles live in the server's `--bundles` folder (the same folder the references are read from, so
the summaries of a deployed model version are accepted without a restart). An operator's upload
arrives in chunks (each request's body is capped, like every write) into `.uploads/<sha256>.part`, and
becomes `<name>-<version>.edgebundle` only once the whole file hashes to the announced sha256 and
verifies as a bundle (signature too, when the server has a public key).

Downloads are capped twice: at most `concurrency` bundle downloads at once (beyond that 503 with
Retry-After, so devices back off instead of queueing on the server), and at most `per_device_factor`
times the bundle's size per device and deployment (429: a device that loops on a download must not
take the bandwidth of the rest).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle.format import SUFFIX, bundle_filename, read_bundle
from device_agent.errors import EdgeKitError

SHA256 = re.compile(r"[0-9a-f]{64}")
UPLOADS = ".uploads"
CHUNK = 1 << 20


class BundleError(ValueError):
    """A request about a bundle that cannot be met; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredBundle:
    path: Path
    sha256: str  # of the whole file: what devices check a download against, and the ETag
    size: int
    name: str
    version: str
    model_sha256: str  # what the devices' summaries name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class BundleFiles:
    """Bundles by file sha256 in one folder (plus explicit `--bundle` files), hashed once per (mtime, size)."""

    def __init__(self, folder: Path | None, extra: list[Path] | None = None,
                 public_key: Ed25519PublicKey | None = None) -> None:
        self.folder = folder
        self.extra = list(extra or [])
        self.public_key = public_key
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[float, int], StoredBundle | None]] = {}

    def _describe(self, path: Path) -> StoredBundle | None:
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_mtime, st.st_size)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            bundle = read_bundle(path)
            found: StoredBundle | None = StoredBundle(path, file_sha256(path), st.st_size, bundle.name,
                                                      bundle.version, bundle.model_sha256)
        except (EdgeKitError, OSError):  # a stray or broken file is not a bundle anyone can deploy
            found = None
        with self._lock:
            self._cache[path] = (key, found)
        return found

    def all(self) -> list[StoredBundle]:
        paths = list(self.extra)
        if self.folder is not None:
            paths += sorted(self.folder.glob(f"*{SUFFIX}"))
        return [b for b in map(self._describe, paths) if b is not None]

    def by_sha256(self, sha256: str) -> StoredBundle | None:
        return next((b for b in self.all() if b.sha256 == sha256), None)

    def by_model(self, model_sha256: str) -> StoredBundle | None:
        """The bundle holding this model (newest file first, should two hold the same model)."""
        found = [b for b in self.all() if b.model_sha256 == model_sha256]
        return max(found, key=lambda b: b.path.stat().st_mtime) if found else None

    def in_folder(self, relative: str) -> StoredBundle:
        """A bundle named by its path inside the folder (no way out of it)."""
        if self.folder is None:
            raise BundleError(400, "this server has no --bundles folder: upload the bundle instead")
        root = self.folder.resolve()
        path = (root / relative).resolve()
        if root not in path.parents or path.suffix != SUFFIX:
            raise BundleError(400, f"bundle_path must name a {SUFFIX} file inside the --bundles folder")
        if not path.is_file():
            raise BundleError(404, f"no bundle {relative!r} in the --bundles folder")
        stored = self._describe(path)
        if stored is None:
            raise BundleError(400, f"{relative!r} does not verify as a bundle")
        self.check_signature(stored)
        return stored

    def check_signature(self, stored: StoredBundle) -> None:
        """With a public key, refuse a bundle the devices would refuse: only signed ones are deployed."""
        if self.public_key is None:
            return
        try:
            read_bundle(stored.path, public_key=self.public_key, require_signature=True)
        except EdgeKitError as exc:
            raise BundleError(422, f"bundle does not verify against the server's --pubkey: {exc}") from exc

    # -- uploads -----------------------------------------------------------------------------

    def upload_chunk(self, sha256: str, size: int, offset: int, data: bytes, max_size: int) -> dict[str, Any]:
        """Append a chunk at `offset` (must equal what is stored, so a retried chunk is harmless);
        when the file is complete, verify it and move it into the folder."""
        if self.folder is None:
            raise BundleError(400, "uploads need a --bundles folder on the server")
        if not SHA256.fullmatch(sha256):
            raise BundleError(400, "sha256 must be 64 lowercase hex digits")
        if not 0 < size <= max_size:
            raise BundleError(413, f"bundle size must be 1 to {max_size} bytes")
        existing = self.by_sha256(sha256)
        if existing is not None:
            return {"sha256": sha256, "have": existing.size, "complete": True, "path": existing.path.name}
        uploads = self.folder / UPLOADS
        uploads.mkdir(exist_ok=True)
        part = uploads / f"{sha256}.part"
        with self._lock:
            have = part.stat().st_size if part.exists() else 0
            if offset != have:
                if offset < have and offset + len(data) <= have:  # a repeated chunk: already stored
                    return {"sha256": sha256, "have": have, "complete": False}
                raise BundleError(409, f"upload of {sha256[:16]}... holds {have} bytes; send offset {have}")
            if have + len(data) > size:
                raise BundleError(400, "chunk runs past the announced size")
            with part.open("ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            have += len(data)
        if have < size:
            return {"sha256": sha256, "have": have, "complete": False}
        return self._finish(part, sha256)

    def _finish(self, part: Path, sha256: str) -> dict[str, Any]:
        actual = file_sha256(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise BundleError(422, f"uploaded bytes hash to {actual[:16]}..., not the announced {sha256[:16]}...")
        checked = part.with_name(f"{sha256}{SUFFIX}")
        os.replace(part, checked)  # hashed and complete: no later chunk may append to it
        try:
            bundle = read_bundle(checked, public_key=self.public_key, require_signature=self.public_key is not None)
        except EdgeKitError as exc:
            checked.unlink(missing_ok=True)
            raise BundleError(422, f"uploaded file is not a bundle this fleet deploys: {exc}") from exc
        assert self.folder is not None
        target = self.folder / bundle_filename(bundle.name, bundle.version)
        if target.exists():
            if file_sha256(target) != sha256:
                checked.unlink(missing_ok=True)
                raise BundleError(409, f"{target.name} already exists in the --bundles folder with other bytes "
                                       "(a version is never replaced: build a new version)")
            checked.unlink(missing_ok=True)
        else:
            os.replace(checked, target)
        return {"sha256": sha256, "have": target.stat().st_size, "complete": True, "path": target.name}


@dataclass(frozen=True)
class DownloadLimits:
    concurrency: int = 64  # bundle downloads served at once; beyond: 503 + Retry-After
    retry_after: int = 5  # seconds a refused device is asked to wait
    per_device_factor: float = 3.0  # bytes per device and deployment, as a multiple of the bundle size


class DownloadSlots:
    """At most `limit` downloads at once; `acquire` says False instead of waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                self.refused += 1
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single `bytes=` range, None for the whole file; BundleError 416
    for a range that cannot be met (several ranges are not served: nobody resuming needs them)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise BundleError(416, "only one bytes= range is served")
    first, sep, last = spec.strip().partition("-")
    try:
        if not sep:
            raise ValueError
        if first == "":  # suffix range: the last N bytes
            n = int(last)
            if n <= 0:
                raise ValueError
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError as exc:
        raise BundleError(416, f"bad Range {header!r}") from exc
    if start < 0 or start >= size or end < start:
        raise BundleError(416, f"range {header!r} is outside the {size} bytes")
    return start, min(end, size - 1)
