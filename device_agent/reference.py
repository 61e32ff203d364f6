"""Reference histograms (`reference.json` in a bundle) and the binning rule shared by everyone.

Binning rule: a channel has finite, strictly increasing `edges` (k+1 values for k bins). A value v
goes to bin `#{interior edges <= v}`, so values below the first edge land in the first bin and
values above the last edge in the last bin (open-ended outer bins; the exact `min`/`max` travel
beside the counts). Numeric channels get quantile edges over the training data (equal reference
mass per bin, which gives the binned drift tests the most power); the class channel gets one bin
per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.channels import CLASS, MonitorPlan

SCHEMA = "edgekit.reference/1"


@dataclass(frozen=True)
class ChannelReference:
    name: str
    kind: str
    edges: np.ndarray  # float64, (bins + 1,)
    counts: np.ndarray  # int64, (bins,)
    n: int
    mean: float
    std: float

    @property
    def bins(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class Reference:
    channels: dict[str, ChannelReference]

    @property
    def names(self) -> list[str]:
        return list(self.channels)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "channels": {
                c.name: {
                    "kind": c.kind,
                    "edges": [float(e) for e in c.edges],
                    "counts": [int(k) for k in c.counts],
                    "n": c.n,
                    "mean": c.mean,
                    "std": c.std,
                }
                for c in self.channels.values()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"reference schema is {data.get('schema')!r}, expected {SCHEMA!r}")
        channels: dict[str, ChannelReference] = {}
        for name, c in data["channels"].items():
            edges = np.asarray(c["edges"], dtype=np.float64)
            counts = np.asarray(c["counts"], dtype=np.int64)
            if edges.ndim != 1 or len(edges) != len(counts) + 1 or len(counts) < 1:
                raise ValueError(f"reference channel {name}: {len(edges)} edges for {len(counts)} bins")
            if not np.all(np.diff(edges) > 0):
                raise ValueError(f"reference channel {name}: edges must be strictly increasing")
            channels[name] = ChannelReference(
                name, str(c["kind"]), edges, counts, int(c["n"]), float(c["mean"]), float(c["std"])
            )
        return cls(channels)


def quantile_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Edges that split `values` into (at most) `bins` bins of equal mass; ties collapse bins."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.array([0.0, 1.0])
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 2:  # a constant channel: one bin around the value
        c = float(edges[0])
        half = max(abs(c) * 1e-6, 1e-9)
        edges = np.array([c - half, c + half])
    return edges


def class_edges(n_classes: int) -> np.ndarray:
    return np.arange(n_classes + 1, dtype=np.float64) - 0.5


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of one channel under the binning rule above (reference side; the agent uses Histogrammer)."""
    idx = np.searchsorted(edges[1:-1], np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.int64)


def build_reference(plan: MonitorPlan, values: np.ndarray, bins: int) -> Reference:
    """Reference histograms from an (n, channels) matrix made by `plan.values` over the training data."""
    names = plan.channel_names
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"values must be (n, {len(names)}), got {values.shape}")
    channels: dict[str, ChannelReference] = {}
    for j, name in enumerate(names):
        column = values[:, j]
        kind = plan.channel_kind(name)
        edges = class_edges(len(plan.labels)) if kind == CLASS else quantile_edges(column, bins)
        channels[name] = ChannelReference(
            name, kind, edges, bin_counts(column, edges), len(column),
            float(np.mean(column)), float(np.std(column)),
        )
    return Reference(channels)
