"""Which bundle may serve: the one rule, at start-up, on every update and on a rollback.

- **Candidates.** A bundle path is a file, or a folder whose `*.edgebundle` files are the candidates
  (newest file first). Every file is untrusted until its manifest and signature verify.
- **One product.** The agent serves one model name: `model_name` when it is configured, otherwise the
  name of the first bundle it serves, pinned from then on. A bundle of another name is refused, at
  start-up and on update alike; `allow_downgrade` does not lift this (a device changes product by
  configuration, not by a file in its folder). At start-up with no configured name, a folder whose
  verified bundles name several models is a configuration error: nothing says which one is this
  device's product.
- **Only up.** An update must carry a higher PEP 440 version than the bundle serving (`versions`). The
  same version with another model is refused (a rebuilt version); the same model bytes are no change.
  A version that is not PEP 440 cannot be ordered, so it is never an upgrade: it serves only as the
  first bundle, or at start-up when no candidate with a PEP 440 version loads, or by a rollback.
  `allow_downgrade` lifts the version rule for updates, and at start-up takes the newest file first.
- **Rollback.** `check_rollback` is the one deliberate way down: a bundle that verifies and is the
  same product may replace the one serving whatever its version.
- **Refusals** are remembered with their reason (newest last, at most `MAX_REJECTED`) for the status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.version import Version

from device_agent.bundle.format import MANIFEST, SUFFIX, read_manifest
from device_agent.bundle.signing import check_signature_settings
from device_agent.bundle.versions import is_upgrade, version_key
from device_agent.errors import ConfigError, EdgeKitError, UsageError, VerificationError

__all__ = [
    "MAX_REJECTED", "BundleSelection", "Rejection", "Versioned", "bundle_candidates", "resolve_bundle",
]

log = logging.getLogger(__name__)

MAX_REJECTED = 16  # refused bundles remembered for the status message, newest kept
DOWNGRADE_HINT = "start the agent with --allow-downgrade (allow_downgrade = true) to accept it"
PRODUCT_HINT = "an agent serves one model: set agent.model_name (--model-name) to the model this device runs"

T = TypeVar("T")


class Versioned(Protocol):
    """What the rule needs to know of a bundle: its model name and version (a `ModelInfo` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


@dataclass(frozen=True)
class _Candidate:
    path: Path
    name: str
    version: str


@dataclass(frozen=True)
class Rejection:
    path: str
    error: str
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "error": self.error, "at": self.at}


def bundle_candidates(path: str | Path) -> list[Path]:
    """The bundle files `path` stands for, newest first: itself, or the *.edgebundle files in a directory."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    candidates = [c for c in p.glob(f"*{SUFFIX}") if c.is_file()]
    if not candidates:
        raise UsageError(f"no *{SUFFIX} file in {p}")
    return sorted(candidates, key=lambda c: (c.stat().st_mtime_ns, c.name), reverse=True)


def resolve_bundle(path: str | Path) -> Path:
    """The bundle file `path` stands for: itself, or the newest *.edgebundle in a directory."""
    return bundle_candidates(path)[0]


class BundleSelection:
    """The "which bundle may serve" rule for one agent, and the bundles it refused."""

    def __init__(self, *, public_key: Ed25519PublicKey | None = None, require_signature: bool = False,
                 allow_downgrade: bool = False, model_name: str | None = None) -> None:
        check_signature_settings(public_key, require_signature)
        if model_name is not None and not model_name:
            raise ConfigError("agent.model_name", "must not be empty")
        self.public_key = public_key
        self.require_signature = require_signature or public_key is not None
        self.allow_downgrade = allow_downgrade
        self.configured_name = model_name
        self.model_name = model_name  # the product: configured, or pinned by the first bundle served
        self._rejected: dict[str, Rejection] = {}
        self._rejected_lock = threading.Lock()  # status is read from HTTP threads while an update refuses
        self.last_refusal: Rejection | None = None

    # -- the product --------------------------------------------------------------------------------

    def pin(self, serving: Versioned) -> None:
        """Record the product once a bundle serves (a no-op when it is already the product)."""
        if self.model_name is None:
            self.model_name = serving.name

    def check_product(self, candidate: Versioned, path: str | Path) -> None:
        """Raise VerificationError unless `candidate` is this agent's product (or none is pinned yet)."""
        self._check_product(candidate.name, path)

    def _check_product(self, name: str, path: str | Path) -> None:
        if self.model_name is not None and name != self.model_name:
            source = "agent.model_name" if self.configured_name is not None else "the first bundle it served"
            raise VerificationError(MANIFEST, f"bundle is model {name!r}, this agent serves {self.model_name!r} "
                                              f"({source}) (in {Path(path).name})", hint=PRODUCT_HINT)

    # -- updates and rollbacks ----------------------------------------------------------------------

    def check_update(self, serving: Versioned, candidate: Versioned, path: str | Path) -> None:
        """Raise VerificationError unless `candidate` may replace `serving` as an update."""
        self._check_product(candidate.name, path)
        if self.allow_downgrade:
            return
        where = f"(in {Path(path).name})"
        upgrade = is_upgrade(serving.version, candidate.version)
        if upgrade is None:
            bad = candidate.version if version_key(candidate.version) is None else serving.version
            raise VerificationError(MANIFEST, f"cannot order version {candidate.version!r} after "
                                              f"{serving.version!r}: {bad!r} is not a PEP 440 version {where}",
                                    hint=DOWNGRADE_HINT)
        if not upgrade:
            raise VerificationError(MANIFEST, f"version {candidate.version} is not newer than the {serving.version} "
                                              f"being served (downgrade or a rebuilt version) {where}",
                                    hint=DOWNGRADE_HINT)

    def check_rollback(self, serving: Versioned, candidate: Versioned, path: str | Path) -> None:
        """Raise VerificationError unless `candidate` may replace `serving` as a deliberate rollback:
        the same product, any version (the caller has verified and self-tested it already)."""
        self._check_product(candidate.name, path)

    # -- start-up -----------------------------------------------------------------------------------

    def select_at_startup(self, path: str | Path, load: Callable[[Path], T], describe: Callable[[T], Versioned],
                          at: float) -> T:
        """The first candidate of the product, in start-up order, that `load` accepts; pins the product.

        A candidate whose manifest does not verify, of another product, or that fails to load is
        refused with its reason and the next one tried, so a garbage file dropped in before a reboot
        does not keep the device down while a good bundle is still there. If none serves, the first
        refusal is raised (VerificationError, exit 4; UsageError, exit 2, for a missing file).
        """
        ordered, first_error = self._startup_order(bundle_candidates(path), at)
        for candidate in ordered:
            try:
                loaded = load(candidate.path)
                self._check_product(describe(loaded).name, candidate.path)  # the file may have changed since
            except EdgeKitError as exc:
                log.error("skipping %s at start-up: %s", candidate.path, exc)
                self.reject(candidate.path, exc, at)
                first_error = first_error or exc
                continue
            self.pin(describe(loaded))
            return loaded
        raise first_error or UsageError(f"no bundle to serve in {path}")

    def _startup_order(self, paths: list[Path], at: float) -> tuple[list[_Candidate], EdgeKitError | None]:
        """The product's candidates whose manifest verifies: highest PEP 440 version first (newest file
        among equals), then the ones with no PEP 440 version, newest file first; with allow_downgrade
        simply the newest file first. Also the first refusal, to raise if nothing serves."""
        verified: list[_Candidate] = []
        first_error: EdgeKitError | None = None
        for path in paths:  # newest file first
            try:
                manifest, _ = read_manifest(path, public_key=self.public_key, require_signature=self.require_signature)
            except EdgeKitError as exc:
                log.error("skipping %s at start-up: %s", path, exc)
                self.reject(path, exc, at)
                first_error = first_error or exc
                continue
            verified.append(_Candidate(path, str(manifest["name"]), str(manifest["version"])))
        if self.model_name is None:
            names = sorted({c.name for c in verified})
            if len(names) > 1:
                raise ConfigError("agent.model_name", f"not set, and the bundles in {paths[0].parent} are of "
                                                      f"{len(names)} models ({', '.join(map(repr, names))})",
                                  hint=PRODUCT_HINT)
        ours: list[_Candidate] = []
        for c in verified:
            try:
                self._check_product(c.name, c.path)
            except VerificationError as exc:
                log.error("skipping %s at start-up: %s", c.path, exc)
                self.reject(c.path, exc, at)
                first_error = first_error or exc
                continue
            ours.append(c)
        if not self.allow_downgrade:
            ours.sort(key=_version_rank, reverse=True)  # stable: newer files stay first among equals
        return ours, first_error

    # -- refusals -----------------------------------------------------------------------------------

    def reject(self, path: str | Path, exc: EdgeKitError, at: float) -> Rejection:
        """Remember that `path` was refused and why (the newest MAX_REJECTED are kept)."""
        rejection = Rejection(str(path), str(exc), at)
        with self._rejected_lock:
            self._rejected.pop(rejection.path, None)
            self._rejected[rejection.path] = rejection
            while len(self._rejected) > MAX_REJECTED:
                self._rejected.pop(next(iter(self._rejected)))
            self.last_refusal = rejection
        return rejection

    def accepted(self, path: str | Path) -> None:
        """`path` now serves (or was the same bundle again): it is no longer a refused one."""
        with self._rejected_lock:
            self._rejected.pop(str(path), None)

    @property
    def rejected(self) -> list[Rejection]:
        """Refused bundles, oldest refusal first."""
        with self._rejected_lock:
            return list(self._rejected.values())


def _version_rank(c: _Candidate) -> tuple[bool, Version]:
    key = version_key(c.version)
    return (key is not None, key if key is not None else Version("0"))
