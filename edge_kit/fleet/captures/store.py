"""The capture store: immutable shard files in a local folder or under an fsspec URL, within a byte quota.

A shard is written whole before anything names it: locally to a temp file beside its name, fsynced and
renamed (`device_agent.atomic`); through fsspec with one `pipe` of the whole file (object stores make
an object visible only once it is complete). A shard is never overwritten by other bytes: its name is
the sha256 of its content. A write that would take the store past `max_bytes`, or that the disk refuses
(ENOSPC, EDQUOT), is `CaptureStoreFull` and leaves nothing behind; files already stored are not touched.

The quota counts every file under the store's root (measured once at start, then added to per write),
in this process: two `fleet serve` processes sharing one store each keep their own count.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from device_agent.atomic import atomic_write_bytes
from edge_kit.errors import UsageError

log = logging.getLogger(__name__)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class CaptureStoreFull(Exception):
    """The store's quota or its disk is full: nothing of the batch was stored (HTTP 507)."""


def _is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


class CaptureStore:
    """Shard files under `location` (a folder, `file://PATH` or an fsspec URL), at most `max_bytes` in all."""

    def __init__(self, location: str, max_bytes: int, *, cache_shards: int = 8) -> None:
        if max_bytes < 1:
            raise UsageError(f"--captures-max-bytes must be positive, got {max_bytes}")
        self.location = location
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_size = cache_shards
        self._fs: Any = None
        if _is_local(location):
            self.root: str = location.removeprefix("file://")
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"--captures {location}: cannot create the folder: {exc.strerror or exc}") from exc
        else:
            try:
                import fsspec  # optional: only stores other than a local folder need it
            except ImportError as exc:
                raise UsageError(f"--captures {location}: URLs other than file:// need fsspec "
                                 "(pip install fsspec, plus s3fs for s3://)") from exc
            try:
                self._fs, self.root = fsspec.core.url_to_fs(location)
                self._fs.makedirs(self.root, exist_ok=True)
            except (ImportError, ValueError, OSError) as exc:
                raise UsageError(f"--captures {location}: cannot use this store: {exc}") from exc
        self.used = self._measure()

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise ValueError(f"not a shard name: {name!r}")
        return f"{self.root.rstrip('/')}/{name}"

    def _measure(self) -> int:
        """Bytes of every file under the root now."""
        if self._fs is not None:
            try:
                return int(self._fs.du(self.root, total=True))
            except (OSError, FileNotFoundError):
                return 0
        total = 0
        for folder, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(folder, f)).st_size
                except OSError:
                    continue
        return total

    def describe(self) -> dict[str, Any]:
        return {"location": self.location, "used_bytes": self.used, "max_bytes": self.max_bytes}

    def put(self, name: str, data: bytes) -> None:
        """Store `data` as the shard `name` whole, or raise CaptureStoreFull with nothing written."""
        path = self._path(name)
        with self._lock:
            if self._exists(path):  # named by its content's sha256: these very bytes are stored already
                return
            if self.used + len(data) > self.max_bytes:
                raise CaptureStoreFull(f"capture store full: {self.used} of {self.max_bytes} bytes used, "
                                       f"this batch needs {len(data)} more (--captures-max-bytes)")
            try:
                if self._fs is None:
                    atomic_write_bytes(path, data, mode=0o600)
                else:
                    self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                    self._fs.pipe_file(path, data)
            except OSError as exc:
                if exc.errno in FULL_ERRNOS:  # the temp file is gone already; nothing else was touched
                    raise CaptureStoreFull(f"capture store full: the disk refused the write "
                                           f"({os.strerror(exc.errno or 0)})") from exc
                raise
            self.used += len(data)

    def _exists(self, path: str) -> bool:
        return Path(path).exists() if self._fs is None else bool(self._fs.exists(path))

    def get(self, name: str) -> bytes:
        """The bytes of a stored shard (the latest few are cached: an export reads one many times)."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        path = self._path(name)
        data = Path(path).read_bytes() if self._fs is None else bytes(self._fs.cat_file(path))
        with self._lock:
            self._cache[name] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def discard(self, name: str) -> None:
        """Remove a shard nothing names (its index rows never committed); best effort."""
        path = self._path(name)
        size = 0
        try:
            size = Path(path).stat().st_size if self._fs is None else int(self._fs.size(path))
        except (OSError, FileNotFoundError):
            return
        if self._remove_quietly(path):
            with self._lock:
                self.used = max(0, self.used - size)

    def _remove_quietly(self, path: str) -> bool:
        try:
            if self._fs is None:
                Path(path).unlink()
            else:
                self._fs.rm_file(path)
            return True
        except (OSError, FileNotFoundError):
            return False
