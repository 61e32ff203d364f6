"""Hot update: notice when the bundle on disk changed and hand it to the agent.

`--bundle` may name a bundle file or a directory of candidates (`selection.bundle_candidates`), so a
deployment tool can drop a new file next to the old one, or replace the file in place with an
atomic rename. Whether a candidate may serve is the agent's decision (`selection`), not the
watcher's. The watcher polls each file's identity (inode, size, mtime) every few seconds: polling
needs no extra dependency and a device sees a handful of updates a year, so a couple of seconds of
latency costs nothing.

Every candidate in the folder is watched, not only the newest: new or changed ones are offered to
the agent newest first until one is accepted, so a stray file dropped after a good bundle does not
hide it. A candidate that fails to load is remembered by identity and not retried until it changes
again, so a garbage file logs one error, not one per poll.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.bundle.selection import bundle_candidates, resolve_bundle
from device_agent.errors import EdgeKitError, UsageError

__all__ = ["BundleWatcher", "bundle_identity", "candidate_identities"]

log = logging.getLogger(__name__)

Identity = tuple[str, int, int, int]


def bundle_identity(path: str | Path) -> Identity | None:
    try:
        target = resolve_bundle(path)
        st = os.stat(target)
    except (OSError, UsageError):
        return None
    return (str(target), st.st_ino, st.st_size, st.st_mtime_ns)


def candidate_identities(path: str | Path) -> dict[str, Identity]:
    """Identity of every candidate `path` stands for (a vanished file is simply absent)."""
    try:
        candidates = bundle_candidates(path)
    except (OSError, UsageError):
        return {}
    found: dict[str, Identity] = {}
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        found[str(c)] = (str(c), st.st_ino, st.st_size, st.st_mtime_ns)
    return found


class BundleWatcher:
    """Polls a bundle path and calls `on_change(path)` for candidates that appeared or changed.

    New or changed candidates are offered newest first until `on_change` accepts one (returns
    without raising): a stray or refused file next to a good new bundle does not hide it. Each one
    offered is remembered by identity, so it is not offered again until it changes.
    """

    def __init__(self, path: str | Path, on_change: Callable[[Path], Any], *, interval: float = 2.0) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self._seen = candidate_identities(self.path)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One poll; True if a change was handed to `on_change` (whatever its outcome)."""
        current = candidate_identities(self.path)
        fresh = [Path(name) for name, ident in current.items() if self._seen.get(name) != ident]  # newest first
        self._seen = current
        for target in fresh:
            log.info("bundle changed: %s", target)
            try:
                self.on_change(target)
                break
            except EdgeKitError:
                continue  # the agent logged and reported it; try the next newest
            except Exception:
                log.exception("loading %s failed unexpectedly; still serving the previous bundle", target)
        return bool(fresh)

    def start(self) -> None:
        def loop() -> None:
            while not self._stopping.wait(self.interval):
                self.check()

        self._thread = threading.Thread(target=loop, name="bundle-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
