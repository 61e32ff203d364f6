"""Reference histograms of each deployed model version, read from its bundle, keyed by model sha256.

A summary names its model by `model.sha256`; the server finds the bundle with that model and tests
the summary's counts against that bundle's `reference.json`. Bundles come from `--bundle` files and/or
a `--bundles` folder, which is re-scanned when it changes so a new model version needs no restart.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.bundle.format import SUFFIX, read_bundle
from device_agent.errors import EdgeKitError
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
        }


def model_reference_from_bundle(path: str | Path) -> ModelReference:
    """Verify a bundle (hashes; signature checked by the agent) and lay out its reference.

    Every way a bundle can be bad is an EdgeKitError (VerificationError from the reader, UsageError
    for a reference that cannot be laid out), so a folder scan can skip it and carry on.
    """
    bundle = read_bundle(path)
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
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"bundle {path}: reference.json or the manifest's monitoring entry is malformed: {exc}"
                         ) from exc


class ReferenceStore:
    """Model references by sha256, from explicit bundle files and a folder re-scanned on demand."""

    def __init__(self, bundles: list[str | Path] | None = None, folder: str | Path | None = None,
                 rescan_interval: float = 2.0) -> None:
        self._by_sha: dict[str, ModelReference] = {}
        self._folder = Path(folder) if folder else None
        self._seen: dict[Path, float] = {}
        self._rescan_interval = rescan_interval
        self._last_scan = 0.0
        self._lock = threading.Lock()
        if self._folder is not None and not self._folder.is_dir():
            raise UsageError(f"--bundles folder not found: {self._folder}")
        for b in bundles or []:
            self.add(model_reference_from_bundle(b))
        self.rescan(force=True)

    def add(self, ref: ModelReference) -> None:
        with self._lock:
            self._by_sha[ref.sha256] = ref

    def rescan(self, *, force: bool = False) -> None:
        """Load bundles that appeared or changed in the folder (at most every `rescan_interval` s)."""
        if self._folder is None:
            return
        now = time.monotonic()
        if not force and now - self._last_scan < self._rescan_interval:
            return
        self._last_scan = now
        for path in sorted(self._folder.glob(f"*{SUFFIX}")):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._seen.get(path) == mtime:
                continue
            self._seen[path] = mtime
            try:
                self.add(model_reference_from_bundle(path))
            except EdgeKitError as exc:  # one bad (or stray) bundle must not stop the others being monitored
                log.warning("skipping bundle %s: %s", path, exc)

    def get(self, sha256: str) -> ModelReference | None:
        ref = self._by_sha.get(sha256)
        if ref is None:
            self.rescan()
            ref = self._by_sha.get(sha256)
        return ref

    def all(self) -> list[ModelReference]:
        self.rescan()
        return list(self._by_sha.values())
