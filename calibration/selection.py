"""Which training samples calibrate the quantizer: seeded, from the training split only, recorded.

The ids are kept sorted so the calibration batches (and so the computed ranges and the quantized
model's bytes) do not depend on the order the sampler happened to draw them in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from calibration.errors import CalibrationError


@dataclass(frozen=True)
class CalibrationSelection:
    """Row positions into the training split, the sample ids they carry, and the hash of those ids."""

    positions: np.ndarray  # int64 indices into X_train, ascending
    ids: tuple[str, ...]
    seed: int

    @property
    def samples(self) -> int:
        return len(self.ids)

    @property
    def ids_sha256(self) -> str:
        return ids_sha256(self.ids)

    def to_manifest(self, method: str) -> dict[str, object]:
        return {"method": method, "samples": self.samples, "ids_sha256": self.ids_sha256, "seed": self.seed}


def ids_sha256(ids: Sequence[str]) -> str:
    """sha256 over the JSON list of ids: stable across runs and independent of numpy's repr."""
    return hashlib.sha256(json.dumps([str(i) for i in ids]).encode("utf-8")).hexdigest()


def select_calibration(train_ids: Sequence[object], samples: int, seed: int) -> CalibrationSelection:
    """Draw `samples` rows of the training split without replacement (all of them if it is smaller)."""
    n = len(train_ids)
    if n == 0:
        raise CalibrationError("the calibration set is empty: the training split has no samples")
    if samples < 1:
        raise CalibrationError(f"calibration_samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    take = min(samples, n)
    positions = np.sort(rng.choice(n, size=take, replace=False)).astype(np.int64)
    ids = tuple(str(train_ids[int(p)]) for p in positions)
    return CalibrationSelection(positions, ids, seed)
