"""Per-window dispersion signal: how far a window's inferences are from independent draws.

The drift tests compare a window's histogram with the reference as if its n inferences were
independent. Devices see correlated inputs (consecutive camera frames, a sensor that repeats, a user
who resends a request), which makes the counts over-dispersed against the multinomial and the tests
overconfident. Only the device sees the order of its inferences, so it measures that here.

The window is cut into consecutive blocks of equal length L (the last one partial); each block keeps
its own histogram per channel. L is not known in advance (a window is a span of time, not a count),
so blocks start at one inference and double by merging neighbours whenever there would be more than
BLOCKS of them: a window of n ends with between BLOCKS / 2 and BLOCKS blocks of n / BLOCKS to
2n / BLOCKS inferences. Per channel the agent reports four numbers (`disp`), which add when
summaries merge:
- X, df: Pearson's chi-square of homogeneity across the blocks, df = (blocks - 1)(bins used - 1).
  With independent draws E[X] = df (given the margins, up to n / (n - 1)); X / df estimates the
  average design effect over all directions of the histogram (what chi-square needs).
- S, blocks - 1: the same for one direction, the block means of each value's reference CDF
  (mid-bin PIT), S = sum_k (sum_k u - n_k mean u)^2 / (n_k var u). With dependence this direction
  (a location shift, what KS sees first) is inflated most: AR(1) inputs inflate it ~4x more than
  the average, so X / df alone left KS overconfident.
With dependence shorter than a block, these ratios estimate the design effects the fleet divides out.
"""

from __future__ import annotations

import numpy as np

BLOCKS = 16


class BlockCounts:
    """Histograms of consecutive blocks of one open window, for every channel at once."""

    def __init__(self, channels: int, max_bins: int) -> None:
        self.counts = np.zeros((channels, BLOCKS, max_bins), dtype=np.int64)
        self.length = 1  # inferences per block
        self.n = 0

    def segments(self, n: int) -> list[tuple[int, int, int]]:
        """Make room for n more inferences; returns (start, stop, block) slices of those n.

        The caller adds each slice's histogram to `counts[:, block]` (a sorted slice is counted
        with a few binary searches per channel, as the window's own counts are), so the block
        histograms cost about what one more sorted pass does.
        """
        k = self.counts.shape[1]
        end = self.n + n
        while end > k * self.length:  # halve the number of blocks: merge neighbours
            self.counts[:, : k // 2] = self.counts[:, 0::2] + self.counts[:, 1::2]
            self.counts[:, k // 2 :] = 0
            self.length *= 2
        out = []
        pos = self.n
        while pos < end:
            block = pos // self.length
            stop = min(end, (block + 1) * self.length)
            out.append((pos - self.n, stop - self.n, block))
            pos = stop
        self.n = end
        return out

    def statistic(self, scores: np.ndarray) -> np.ndarray:
        """(channels, 4): X, df, S, blocks - 1 (see the module docstring); `scores` (channels, bins) PITs."""
        x, df = homogeneity(self.counts)
        s, k = location_dispersion(self.counts, scores)
        return np.stack([x, df, s, k], axis=1).astype(np.float64)


def homogeneity(block_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson's X and df of a (channels, blocks, bins) table, per channel, over non-empty rows/columns."""
    o = np.asarray(block_counts, dtype=np.float64)
    sizes = o.sum(axis=2)  # (C, K)
    bins = o.sum(axis=1)  # (C, B)
    n = sizes.sum(axis=1)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = sizes[:, :, None] * bins[:, None, :] / n[:, None, None]
        x = np.where(e > 0, (o - e) ** 2 / np.where(e > 0, e, 1.0), 0.0).sum(axis=(1, 2))
    df = np.maximum((sizes > 0).sum(axis=1) - 1, 0) * np.maximum((bins > 0).sum(axis=1) - 1, 0)
    return np.nan_to_num(x), df.astype(np.int64)


def location_dispersion(block_counts: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S and its df (blocks - 1) per channel: between-block variance of the mean score, over its iid value."""
    o = np.asarray(block_counts, dtype=np.float64)
    sizes = o.sum(axis=2)  # (C, K)
    n = sizes.sum(axis=1)
    sums = np.einsum("ckb,cb->ck", o, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(axis=1) / n
        var = np.einsum("cb,cb->c", o.sum(axis=1), (scores - mean[:, None]) ** 2) / n
        dev = np.where(sizes > 0, (sums - sizes * mean[:, None]) ** 2 / np.where(sizes > 0, sizes, 1.0), 0.0)
        s = np.where(var > 0, dev.sum(axis=1) / var, 0.0)
    k = np.where(var > 0, np.maximum((sizes > 0).sum(axis=1) - 1, 0), 0)
    return np.nan_to_num(s), k.astype(np.int64)


def pit_scores(reference_counts: np.ndarray) -> np.ndarray:
    """(channels, bins) mid-bin reference CDF of each bin: the score whose block means S tracks."""
    counts = np.asarray(reference_counts, dtype=np.float64)
    total = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return np.asarray((np.cumsum(counts, axis=1) - counts / 2) / total)
