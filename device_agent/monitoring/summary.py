"""Window summaries: mergeable histograms of what a model saw and said (docs/architecture.md section 6).

A `WindowSummary` is a value with `zero`, `update` and `merge`, in the style of whylogs metrics: two
summaries of the same model merge by adding, so the server can pool windows across devices and time.
Its wire form (`to_bytes`/`from_bytes`, content types) is `summary_codec`; the checks a hostile
document goes through before it becomes a summary are `summary_validation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.monitoring import summary_codec
from device_agent.monitoring.dispersion import BlockCounts, pit_scores
from device_agent.monitoring.reference import Reference
from device_agent.monitoring.repeats import RepeatCounter
from device_agent.monitoring.summary_validation import SCHEMA


class Histogrammer:
    """Precomputed binning for all channels of one reference, applied to a whole batch at once."""

    def __init__(self, reference: Reference) -> None:
        self.names = reference.names
        self.bins = np.array([c.bins for c in reference.channels.values()], dtype=np.int64)
        self.max_bins = int(self.bins.max())
        self._edges = [np.ascontiguousarray(c.edges[1:-1]) for c in reference.channels.values()]
        padded = np.zeros((len(self.names), self.max_bins))
        for j, c in enumerate(reference.channels.values()):
            padded[j, : c.bins] = c.counts
        self.scores = pit_scores(padded)  # for the dispersion signal (device_agent/monitoring/dispersion.py)

    def counts(self, values: np.ndarray) -> np.ndarray:
        """(channels, max_bins) int64 counts of an (n, channels) value matrix."""
        return self.counts_sorted(np.sort(values.T, axis=1))

    def counts_sorted(self, sorted_columns: np.ndarray) -> np.ndarray:
        """Counts from channel-major values with each channel's row sorted ascending.

        With the values sorted, a bin's count is a difference of two positions: #{v < e} for each
        interior edge e is one binary search of the edge among the values, so a chunk costs one
        (SIMD) sort plus bins-many searches per channel, instead of one search per value.
        Bin = #{interior edges <= v}, exactly as `reference.bin_counts`.
        """
        n = sorted_columns.shape[1]
        counts = np.zeros((len(self.names), self.max_bins), dtype=np.int64)
        for j, edges in enumerate(self._edges):  # a loop over channels, never over values
            below = np.searchsorted(sorted_columns[j], edges, side="left")
            bins = len(edges) + 1
            counts[j, 0] = below[0] if len(edges) else n
            if len(edges):
                counts[j, 1 : bins - 1] = np.diff(below)
                counts[j, bins - 1] = n - below[-1]
        return counts


@dataclass
class WindowSummary:
    """Everything one device reports about one model for one time window."""

    fleet: str
    device: str
    model: dict[str, str]  # name, version, sha256
    window_start: float
    window_end: float
    seq: int
    channel_names: list[str]
    bins: np.ndarray  # (channels,) bins per channel
    counts: np.ndarray  # (channels, max_bins) int64
    minimum: np.ndarray  # (channels,) float64, +inf while empty
    maximum: np.ndarray
    total: np.ndarray  # sum of values
    total_sq: np.ndarray  # sum of squared values
    n: int = 0
    label_names: list[str] = field(default_factory=list)
    confusion: np.ndarray | None = None  # (classes, classes), rows = true class, cols = predicted
    blocks: BlockCounts | None = None  # the open window's block histograms (agent side)
    scores: np.ndarray | None = None  # (channels, max_bins) reference PIT per bin, with `blocks`
    dispersion: np.ndarray | None = None  # (channels, 4): X, df, S, k carried from decoded/merged windows
    repeats: RepeatCounter | None = None  # exact repeats of the inputs (agent side)
    n_eff: float | None = None  # effective sample size carried from decoded/merged windows

    @classmethod
    def zero(
        cls,
        histogrammer: Histogrammer,
        *,
        fleet: str,
        device: str,
        model: dict[str, str],
        window_start: float,
        seq: int = 0,
        label_names: list[str] | None = None,
    ) -> WindowSummary:
        c = len(histogrammer.names)
        return cls(
            fleet=fleet,
            device=device,
            model=dict(model),
            window_start=float(window_start),
            window_end=float(window_start),
            seq=seq,
            channel_names=list(histogrammer.names),
            bins=histogrammer.bins.copy(),
            counts=np.zeros((c, histogrammer.max_bins), dtype=np.int64),
            minimum=np.full(c, np.inf),
            maximum=np.full(c, -np.inf),
            total=np.zeros(c),
            total_sq=np.zeros(c),
            label_names=list(label_names or []),
            blocks=BlockCounts(c, histogrammer.max_bins),
            scores=histogrammer.scores,
            repeats=RepeatCounter(),
        )

    def update(self, histogrammer: Histogrammer, values: np.ndarray) -> None:
        """Add a batch: `values` is the (n, channels) matrix from `MonitorPlan.values`."""
        if len(values) == 0:
            return
        if self.blocks is not None:  # arrival order matters here: go through the block path
            self.update_by_channel(histogrammer, np.ascontiguousarray(values.T))
            return
        self.counts += histogrammer.counts(values)
        np.minimum(self.minimum, values.min(axis=0), out=self.minimum)
        np.maximum(self.maximum, values.max(axis=0), out=self.maximum)
        self.total += values.sum(axis=0)
        self.total_sq += np.einsum("ij,ij->j", values, values)
        self.n += len(values)

    def update_by_channel(self, histogrammer: Histogrammer, columns: np.ndarray) -> None:
        """Add a batch given channel-major, (channels, n), as `MonitorPlan.values_by_channel` makes it."""
        if columns.shape[1] == 0:
            return
        # Sorted slices, one per block the batch touches (at most BLOCKS + 1): each slice's counts
        # go to its block and to the window (one search per value was 10x slower than this).
        slices = [(0, columns.shape[1], -1)] if self.blocks is None else self.blocks.segments(columns.shape[1])
        for lo, hi, block in slices:
            ordered = np.sort(columns[:, lo:hi], axis=1)
            counts = histogrammer.counts_sorted(ordered)
            self.counts += counts
            if self.blocks is not None:
                self.blocks.counts[:, block] += counts
            np.minimum(self.minimum, ordered[:, 0], out=self.minimum)
            np.maximum(self.maximum, ordered[:, -1], out=self.maximum)
        self.total += columns.sum(axis=1)
        self.total_sq += np.einsum("ij,ij->i", columns, columns)
        self.n += columns.shape[1]

    def count_inputs(self, raw: np.ndarray) -> None:
        """Note the raw input rows of inferences added (or to be added) by `update`, for exact repeats."""
        if self.repeats is not None:
            self.repeats.add(raw)

    def effective_n(self) -> float | None:
        """n^2 / sum of squared multiplicities of identical inputs, or None when not every input was seen."""
        if self.repeats is not None and self.repeats.rows == self.n and self.n_eff is None:
            return self.repeats.effective_n()
        return self.n_eff

    def update_labels(self, true_classes: np.ndarray, predicted_classes: np.ndarray) -> None:
        """Add ground truth fed back for earlier predictions (confusion counts)."""
        k = len(self.label_names)
        if k == 0:
            raise ValueError("this summary has no class labels to count")
        t = np.asarray(true_classes, dtype=np.int64)
        p = np.asarray(predicted_classes, dtype=np.int64)
        if t.shape != p.shape or (t.size and (t.min() < 0 or t.max() >= k or p.min() < 0 or p.max() >= k)):
            raise ValueError(f"labels must be class indices in [0, {k}) with one per prediction")
        if self.confusion is None:
            self.confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(self.confusion, (t, p), 1)

    def merge(self, other: WindowSummary) -> WindowSummary:
        """A new summary holding both (same model and channels); the window spans both."""
        if other.model.get("sha256") != self.model.get("sha256") or other.channel_names != self.channel_names:
            raise ValueError("only summaries of the same model and channels can be merged")
        confusion = self.confusion
        if other.confusion is not None:
            confusion = other.confusion.copy() if confusion is None else confusion + other.confusion
        return WindowSummary(
            fleet=self.fleet,
            device=self.device if self.device == other.device else "*",
            model=dict(self.model),
            window_start=min(self.window_start, other.window_start),
            window_end=max(self.window_end, other.window_end),
            seq=max(self.seq, other.seq),
            channel_names=list(self.channel_names),
            bins=self.bins.copy(),
            counts=self.counts + other.counts,
            minimum=np.minimum(self.minimum, other.minimum),
            maximum=np.maximum(self.maximum, other.maximum),
            total=self.total + other.total,
            total_sq=self.total_sq + other.total_sq,
            n=self.n + other.n,
            label_names=list(self.label_names),
            confusion=None if confusion is None else confusion.copy(),
            dispersion=_add_optional(self.dispersion_statistic(), other.dispersion_statistic()),
            n_eff=_merged_effective_n(self.n, self.effective_n(), other.n, other.effective_n()),
        )

    def dispersion_statistic(self) -> np.ndarray | None:
        """(channels, 4) X, df, S, k of this window (summed over merged windows), or None."""
        if self.blocks is None or self.scores is None:
            return None if self.dispersion is None else self.dispersion.copy()
        own = self.blocks.statistic(self.scores)
        return own if self.dispersion is None else own + self.dispersion

    def channel_counts(self, name: str) -> np.ndarray:
        i = self.channel_names.index(name)
        return np.asarray(self.counts[i, : self.bins[i]])

    # -- wire form (device_agent/monitoring/summary_codec.py) ------------------------------------

    def to_payload(self) -> dict[str, Any]:
        """The JSON document of this summary (its bytes: `to_bytes`)."""
        channels = {}
        disp = self.dispersion_statistic()
        for i, name in enumerate(self.channel_names):
            empty = self.n == 0
            channels[name] = {
                "counts": self.counts[i, : self.bins[i]].tolist(),
                "min": None if empty else summary_codec.json_number(self.minimum[i]),
                "max": None if empty else summary_codec.json_number(self.maximum[i]),
                "sum": summary_codec.json_number(self.total[i]),
                "sumsq": summary_codec.json_number(self.total_sq[i]),
            }
            if disp is not None:  # 5 significant digits: an estimate with ~10% noise needs no more
                d = disp[i]
                channels[name]["disp"] = [float(f"{d[0]:.5g}"), int(d[1]), float(f"{d[2]:.5g}"), int(d[3])]
        payload: dict[str, Any] = {
            "schema": SCHEMA,
            "fleet": self.fleet,
            "device": self.device,
            "model": dict(self.model),
            "window": {"start": self.window_start, "end": self.window_end, "seq": self.seq},
            "n": self.n,
            "channels": channels,
        }
        n_eff = self.effective_n()
        if n_eff is not None:  # 5 significant digits, never above n
            payload["n_eff"] = min(float(f"{n_eff:.5g}"), float(self.n))
        if self.confusion is not None:
            payload["labels"] = {
                "classes": list(self.label_names),
                "n": int(self.confusion.sum()),
                "confusion": self.confusion.tolist(),
            }
        return payload

    def to_bytes(self, *, compress: bool = True) -> tuple[bytes, str]:
        """Encoded payload and its MQTT 5 content type."""
        return summary_codec.encode(self.to_payload(), compress=compress)

    @classmethod
    def from_payload(cls, payload: Any) -> WindowSummary:
        """The summary a (hostile) JSON document describes; `PayloadError` if it is not one."""
        return cls(**summary_codec.fields_from_payload(payload))

    @classmethod
    def from_bytes(cls, data: bytes, content_type: str | None = summary_codec.CONTENT_TYPE_JSON, *,
                   fast_loads: Callable[[bytes], Any] | None = None) -> WindowSummary:
        return cls.from_payload(summary_codec.decode_payload(data, content_type, fast_loads=fast_loads))


def _add_optional(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:  # a merge with a window that has no signal has none for the whole
        return None
    total: np.ndarray = a + b
    return total


def _merged_effective_n(n_a: int, a: float | None, n_b: int, b: float | None) -> float | None:
    """Effective n of two windows together: their sums of squared multiplicities add (inputs apart)."""
    if a is None or b is None:
        return None
    squares = (n_a * n_a / a if a > 0 else 0.0) + (n_b * n_b / b if b > 0 else 0.0)
    total = n_a + n_b
    return float(min(total, total * total / squares)) if squares > 0 else float(total)
