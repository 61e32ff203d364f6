"""Which predicted rows are captured: `fraction` of them at random, the rows the fleet asked for, all
within `bytes_per_day` of input bytes per UTC day.

The common case is a batch of which nothing is kept, and it costs a subtraction: instead of one random
draw per row, the sampler draws the gap to the next kept row (geometric with p = `fraction`, the exact
distribution of the gaps between successes of one Bernoulli(`fraction`) draw per row) and counts rows
down to it; the gaps of a batch that holds kept rows come from one vectorised call. Nothing is
written for a row that is not kept. Rows the fleet requested
are the next predicted rows, taken first, whatever `fraction` says; they count against the day's
budget like the others, and a requested row over the budget is used up all the same (skipped and
counted), so a request is the next N rows, not "N rows whenever there is room".

Not thread-safe: the caller holds one lock around `choose` and `within_budget`.
"""

from __future__ import annotations

import math

import numpy as np

DAY_S = 86_400


def utc_day(t: float) -> int:
    """Days since the epoch (the UTC day `t` falls in)."""
    return int(t // DAY_S)


class Sampler:
    def __init__(self, fraction: float, bytes_per_day: int, *, seed: int | None = None, requested: int = 0,
                 day: int = 0, used: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be between 0 and 1")
        self.fraction = fraction
        self.bytes_per_day = bytes_per_day
        self.rng = np.random.default_rng(seed)
        self._next = self._gap()  # rows still to pass before the next one kept at random
        self.requested = requested  # rows the fleet asked for, still to come
        self.day, self.used = day, used  # the UTC day the budget counts, and the input bytes kept in it

    def choose(self, n: int) -> tuple[np.ndarray | None, int]:
        """(indices of the rows of an n-row batch to keep, or None; how many of them the fleet requested)."""
        if self.requested:
            take = min(n, self.requested)
            self.requested -= take
            rest = self._draw(n - take)
            head = np.arange(take)
            return (head if rest is None else np.concatenate([head, rest + take])), take
        return self._draw(n), 0

    def _gap(self) -> float:
        """Rows passed before the next kept one (failures before a success); never one at fraction 0."""
        if self.fraction <= 0.0:
            return math.inf
        return float(self.rng.geometric(self.fraction) - 1)

    def _draw(self, n: int) -> np.ndarray | None:
        """Row indices kept at random from the next `n` rows."""
        if n <= self._next:
            self._next -= n
            return None
        pos: float = self._next
        kept: list[np.ndarray] = []
        while pos < n:
            gaps = self.rng.geometric(self.fraction, size=int((n - pos) * self.fraction * 1.25) + 8)
            # at[0] = pos, at[j] = pos + gaps[0] + ... + gaps[j-1]; in float64, since a tiny fraction draws
            # gaps near the int64 limit (exact below 2**53, where every row index lies)
            at = np.empty(len(gaps))
            at[0] = pos
            at[1:] = pos + np.cumsum(gaps[:-1], dtype=np.float64)
            inside = int(np.searchsorted(at, n))
            kept.append(at[:inside].astype(np.int64))
            pos = at[inside] if inside < len(at) else at[-1] + gaps[-1]
        self._next = float(pos) - n
        return np.concatenate(kept)

    def within_budget(self, rows: int, row_bytes: int, now: float) -> int:
        """How many of `rows` rows of `row_bytes` each fit in the day's budget; counts them as used."""
        day = utc_day(now)
        if day != self.day:
            self.day, self.used = day, 0
        fit = max(0, self.bytes_per_day - self.used) // max(1, row_bytes)
        kept = min(rows, fit)
        self.used += kept * row_bytes
        return kept
