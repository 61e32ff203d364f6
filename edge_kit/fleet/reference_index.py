"""Reference histograms of each deployed model version, read from its bundle, keyed by model sha256.

A summary names its model by `model.sha256`; the server finds the bundle with that model and tests
the summary's counts against that bundle's `reference.json`. Bundles come from `--bundle` files and/or
a `--bundles` folder, which is re-scanned when it changes so a new model version needs no restart.

A file in the folder is untrusted: with a public key (`--pubkey`, `pubkey` in the fleet config) only
bundles signed by that key are used, and every other file is skipped with a counted, logged reason
(`rejected()`). Whatever the key, the first reference loaded for a model sha256 stays: a later bundle
with the same model and a different `reference.json` is refused (`reference_conflict`), so rewriting a
reference can never replace the one devices are tested against.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.bundle.format import REFERENCE, SUFFIX, read_bundle
from device_agent.bundle.signing import public_key_fingerprint
from device_agent.errors import EXIT_VERIFICATION, EdgeKitError, VerificationError
from device_agent.monitoring.channels import CLASS
from device_agent.monitoring.reference import Reference
from edge_kit.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelReference:
    """One model version's reference, laid out for vectorised tests (channels padded to B bins)."""

    sha256: str
    name: str
    version: str
    channel_names: list[str]
    kinds: list[str]
    bins: np.ndarray  # (C,)
    edges: np.ndarray  # (C, B + 1), padded by repeating the last edge
    counts: np.ndarray  # (C, B) int64, zero-padded
    n: np.ndarray  # (C,)
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)
    labels: list[str]
    gate_accuracy: float | None  # the int8 accuracy the build's gate measured on held-out data
    source: str
    untestable: dict[str, str] = field(default_factory=dict)  # channel -> why it is not tested
    reference_sha256: str = ""  # of the bundle's reference.json bytes: tells two references of one model apart
    signed_by: str | None = None  # fingerprint of the key that verified the bundle, None when unchecked

    @classmethod
    def from_reference(
        cls,
        reference: Reference,
        *,
        sha256: str,
        name: str,
        version: str,
        labels: list[str],
        gate_accuracy: float | None = None,
        source: str = "",
        reference_sha256: str = "",
        signed_by: str | None = None,
    ) -> ModelReference:
        chans = list(reference.channels.values())
        bins = np.array([c.bins for c in chans], dtype=np.int64)
        width = int(bins.max())
        edges = np.empty((len(chans), width + 1))
        counts = np.zeros((len(chans), width), dtype=np.int64)
        for i, c in enumerate(chans):
            edges[i, : c.bins + 1] = c.edges
            edges[i, c.bins + 1 :] = c.edges[-1]
            counts[i, : c.bins] = c.counts
        return cls(
            sha256=sha256,
            name=name,
            version=version,
            channel_names=[c.name for c in chans],
            kinds=[c.kind for c in chans],
            bins=bins,
            edges=edges,
            counts=counts,
            n=np.array([c.n for c in chans], dtype=np.int64),
            mean=np.array([c.mean for c in chans]),
            std=np.array([c.std for c in chans]),
            labels=list(labels),
            gate_accuracy=gate_accuracy,
            source=source,
            untestable=reference.untestable(),
            reference_sha256=reference_sha256,
            signed_by=signed_by,
        )

    @functools.cached_property
    def testable(self) -> np.ndarray:
        """(C,) bool: channels that are tested and count in the multiple-testing correction."""
        return np.array([name not in self.untestable for name in self.channel_names])

    @property
    def width(self) -> int:
        return int(self.counts.shape[1])

    @property
    def is_class(self) -> np.ndarray:
        return np.array([k == CLASS for k in self.kinds])

    @functools.cached_property
    def flat_index(self) -> np.ndarray:
        """Positions in the flattened (C * B) padded layout of the payload's concatenated counts."""
        return np.concatenate([i * self.width + np.arange(b) for i, b in enumerate(self.bins)])

    def unflatten(self, flat: np.ndarray, dtype: type = np.int64) -> np.ndarray:
        """(W, sum(bins)) concatenated counts -> (W, C, B) counts, zero-padded (one slice copy per channel)."""
        flat = np.atleast_2d(flat)
        out: np.ndarray = np.zeros((flat.shape[0], len(self.bins), self.width), dtype=dtype)
        offset = 0
        for c, b in enumerate(self.bins):
            out[:, c, :b] = flat[:, offset : offset + b]
            offset += int(b)
        return out

    def describe(self) -> dict[str, object]:
        return {
            "sha256": self.sha256,
            "name": self.name,
            "version": self.version,
            "channels": len(self.channel_names),
            "labels": self.labels,
            "gate_accuracy": self.gate_accuracy,
            "source": self.source,
            "untestable": dict(self.untestable),
            "signed_by": self.signed_by,
        }


def model_reference_from_bundle(path: str | Path, public_key: Ed25519PublicKey | None = None) -> ModelReference:
    """Verify a bundle (hashes, and with `public_key` its signature by that key) and lay out its reference.

    Every way a bundle can be bad is an EdgeKitError (VerificationError from the reader, UsageError
    for a reference that cannot be laid out), so a folder scan can skip it and carry on.
    """
    bundle = read_bundle(path, public_key=public_key)
    if not bundle.reference:
        raise UsageError(f"bundle {path} has no reference.json: it cannot be monitored")
    try:
        reference = Reference.from_json(bundle.reference)
        monitoring = bundle.manifest.get("monitoring") or {}
        labels = [str(x) for x in monitoring.get("labels", bundle.manifest.get("model", {}).get("labels", []))]
        gate = bundle.manifest.get("gate") or {}
        gate_accuracy = gate.get("int8") if isinstance(gate.get("int8"), int | float) else None
        return ModelReference.from_reference(
            reference,
            sha256=bundle.model_sha256,
            name=bundle.name,
            version=bundle.version,
            labels=labels,
            gate_accuracy=None if gate_accuracy is None else float(gate_accuracy),
            source=str(path),
            reference_sha256=hashlib.sha256(bundle.members[REFERENCE]).hexdigest(),
            signed_by=bundle.signed_by,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"bundle {path}: reference.json or the manifest's monitoring entry is malformed: {exc}"
                         ) from exc


@dataclass(frozen=True)
class RejectedBundle:
    """A bundle file the store did not use, and why (`kind` is the /metrics label)."""

    path: str
    kind: str  # unsigned | bad_signature | unreadable | reference_conflict
    reason: str
    at: float

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "kind": self.kind, "reason": self.reason, "at": self.at}


def rejection_kind(exc: EdgeKitError) -> str:
    """The /metrics label of a bundle that failed to load."""
    if isinstance(exc, VerificationError) and exc.member == "manifest.sig":
        return "unsigned" if "unsigned" in exc.message else "bad_signature"
    return "unreadable"


class ReferenceConflict(EdgeKitError):
    """A second bundle for a model already known, with another reference: refused, never a replacement."""

    exit_code = EXIT_VERIFICATION


class ReferenceStore:
    """Model references by sha256, from explicit bundle files and a folder re-scanned on demand.

    With `public_key`, a bundle must be signed by it to be used. Explicit `bundles` that fail are
    errors (the operator named them); folder files that fail are skipped and recorded in `rejected()`.
    """

    def __init__(self, bundles: list[str | Path] | None = None, folder: str | Path | None = None,
                 rescan_interval: float = 2.0, public_key: Ed25519PublicKey | None = None) -> None:
        self._by_sha: dict[str, ModelReference] = {}
        self._folder = Path(folder) if folder else None
        self._seen: dict[Path, float] = {}
        self._rescan_interval = rescan_interval
        self._last_scan = 0.0
        self._lock = threading.Lock()
        self.public_key = public_key
        self.verified_by = public_key_fingerprint(public_key) if public_key is not None else None
        self._rejected: dict[str, RejectedBundle] = {}  # the latest reason per file
        self._rejections: dict[str, int] = {}  # kind -> count, for /metrics
        if self._folder is not None and not self._folder.is_dir():
            raise UsageError(f"--bundles folder not found: {self._folder}")
        for b in bundles or []:
            self.add(model_reference_from_bundle(b, public_key))
        self.rescan(force=True)

    def add(self, ref: ModelReference) -> None:
        """Use `ref` for its model, unless that model already has another reference (ReferenceConflict).

        The first verified reference of a model stays until the server restarts: a later bundle with
        the same model.onnx cannot swap the histograms the fleet tests against, whoever signed it.
        """
        with self._lock:
            known = self._by_sha.get(ref.sha256)
            if known is None or (known.source == ref.source and known.reference_sha256 == ref.reference_sha256):
                self._by_sha[ref.sha256] = ref
                return
            if known.reference_sha256 == ref.reference_sha256:
                return  # the same reference in a second file (a copy): nothing changes
        raise ReferenceConflict(
            f"bundle {ref.source} holds model sha256 {ref.sha256[:16]}... with another reference.json than "
            f"{known.source}, which is in use; the first stays (restart to change a model's reference)")

    def _reject(self, path: Path, exc: EdgeKitError) -> None:
        kind = "reference_conflict" if isinstance(exc, ReferenceConflict) else rejection_kind(exc)
        with self._lock:
            self._rejected[str(path)] = RejectedBundle(str(path), kind, exc.message, time.time())
            self._rejections[kind] = self._rejections.get(kind, 0) + 1
        log.warning("skipping bundle %s (%s): %s", path, kind, exc)

    def rejected(self) -> list[RejectedBundle]:
        """Files in the folder that are not used, with the latest reason for each."""
        with self._lock:
            return sorted(self._rejected.values(), key=lambda r: r.path)

    def rejection_counts(self) -> dict[str, int]:
        """Bundle rejections so far, by kind (a file counts again each time it changes)."""
        with self._lock:
            return dict(self._rejections)

    def describe(self) -> dict[str, object]:
        """How bundles are trusted, for the API: the verifying key and what was refused."""
        return {"verified_by": self.verified_by, "signature_required": self.public_key is not None,
                "rejected": [r.describe() for r in self.rejected()], "rejections": self.rejection_counts()}

    def rescan(self, *, force: bool = False) -> None:
        """Load bundles that appeared or changed in the folder (at most every `rescan_interval` s)."""
        if self._folder is None:
            return
        now = time.monotonic()
        if not force and now - self._last_scan < self._rescan_interval:
            return
        self._last_scan = now
        present = sorted(self._folder.glob(f"*{SUFFIX}"))
        with self._lock:  # a file that is gone is no longer refused (its count stays)
            for gone in set(self._rejected) - {str(p) for p in present}:
                del self._rejected[gone]
        for path in present:
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._seen.get(path) == mtime:
                continue
            self._seen[path] = mtime
            try:
                self.add(model_reference_from_bundle(path, self.public_key))
            except EdgeKitError as exc:  # one bad (or stray) bundle must not stop the others being monitored
                self._reject(path, exc)
                continue
            with self._lock:
                self._rejected.pop(str(path), None)

    def get(self, sha256: str) -> ModelReference | None:
        ref = self._by_sha.get(sha256)
        if ref is None:
            self.rescan()
            ref = self._by_sha.get(sha256)
        return ref

    def all(self) -> list[ModelReference]:
        self.rescan()
        return list(self._by_sha.values())
