"""Exact repeats of inputs within a window, and the effective sample size they leave.

A window drawn from a small fixed set of inputs (a fixed camera, a replayed test set) holds the same
input many times, in any order. Its counts then vary more than independent draws allow, by the design
effect sum(m_i^2) / n over the distinct inputs' multiplicities m_i (Kish): the effective sample size
is n_eff = n^2 / sum(m_i^2). The block-based dispersion signal only sees repeats that arrive close
together; this sees them wherever they fall.

Each input row is hashed to 64 bits with numpy (a multiply-add of its 64-bit words, or 32-bit ones
for rows of an odd number of them, with fixed random odd keys, then a mixing step): no per-row
Python call. Memory is bounded: past `max_hashes` kept hashes, only those whose top bits are zero
are kept (a hash-based sample of the distinct inputs, the same rate for every copy of an input), and
sum(m_i^2) is estimated from the sample.
"""

from __future__ import annotations

import numpy as np

MAX_HASHES = 1 << 18  # 2 MiB of hashes per window; windows up to this many inferences are counted exactly
_SEED = 0x5EED_2026
_MIX = np.uint64(0x9E3779B97F4A7C15)
_COLUMNS_PER_PASS = 4096  # bounds the temporary uint64 copy for large inputs (camera frames)


class RepeatCounter:
    """Multiplicities of identical input rows seen in one window."""

    def __init__(self, max_hashes: int = MAX_HASHES) -> None:
        self.max_hashes = max(1, int(max_hashes))
        self.rows = 0  # rows hashed (each inference's input once)
        self.level = 0  # hashes kept: top `level` bits zero, a sample of 2**-level of the distinct inputs
        self._keys: np.ndarray | None = None
        self._kept: list[np.ndarray] = []
        self._kept_count = 0

    def add(self, rows: np.ndarray) -> None:
        """Hash a batch of input rows (first axis = inferences)."""
        if len(rows) == 0:
            return
        hashes = self._hash(rows)
        self.rows += len(rows)
        if self.level:
            hashes = hashes[(hashes >> np.uint64(64 - self.level)) == 0]
        self._kept.append(hashes)
        self._kept_count += len(hashes)
        if self._kept_count > self.max_hashes:
            self._thin()

    def sum_squared_multiplicities(self) -> float:
        """Estimate of sum(m_i^2) over the distinct inputs (exact while nothing was thinned)."""
        if not self._kept_count:
            return 0.0
        _, counts = np.unique(np.concatenate(self._kept), return_counts=True)
        return float(np.square(counts, dtype=np.float64).sum()) * float(2**self.level)

    def effective_n(self) -> float:
        """n^2 / sum(m_i^2), at most n (every row distinct)."""
        if self.rows == 0:
            return 0.0
        total = max(self.sum_squared_multiplicities(), float(self.rows))
        return min(float(self.rows), self.rows * self.rows / total)

    def _hash(self, rows: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
        if flat.dtype.itemsize % 4 or flat.size == 0:
            flat = np.ascontiguousarray(flat.astype(np.float32))
        if flat.shape[1] * flat.dtype.itemsize % 8 == 0:
            # Rows of whole 64-bit words: hashed in place, one integer matrix-vector product (numpy's
            # own loop, no BLAS for integers; products and sums wrap, a hash mod 2**64), no copy.
            # Five times faster on digits chunks than widening 32-bit words.
            words = flat.view(np.uint64)
            h: np.ndarray = np.matmul(words, self._keys_for(words.shape[1]))
        else:
            words = flat.view(np.uint32)
            keys = self._keys_for(words.shape[1])
            h = np.zeros(len(words), dtype=np.uint64)
            for lo in range(0, words.shape[1], _COLUMNS_PER_PASS):  # bounds the widened copy
                h += words[:, lo : lo + _COLUMNS_PER_PASS].astype(np.uint64) @ keys[lo : lo + _COLUMNS_PER_PASS]
        h ^= h >> np.uint64(31)
        h *= _MIX
        h ^= h >> np.uint64(29)
        return h

    def _keys_for(self, width: int) -> np.ndarray:
        """Fixed random odd 64-bit keys, one per word of a row (the same for every window)."""
        if self._keys is None or len(self._keys) != width:
            rng = np.random.default_rng(_SEED)
            self._keys = rng.integers(0, 2**63, width, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return self._keys

    def _thin(self) -> None:
        kept = np.concatenate(self._kept)
        while len(kept) > self.max_hashes and self.level < 63:
            self.level += 1
            kept = kept[(kept >> np.uint64(64 - self.level)) == 0]
        self._kept = [kept]
        self._kept_count = len(kept)
