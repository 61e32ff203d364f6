"""Reference histograms (`reference.json` in a bundle) and the binning rule shared by everyone.

Binning rule: a channel has finite, strictly increasing `edges` (k+1 values for k bins). A value v
goes to bin `#{interior edges <= v}`, so values below the first edge land in the first bin and
values above the last edge in the last bin (open-ended outer bins; the exact `min`/`max` travel
beside the counts). Numeric channels get quantile edges over the training data (equal reference
mass per bin, which gives the binned drift tests the most power); the class channel gets one bin
per class.

Point masses (blank image columns are exactly 0, saturated sensors sit on their maximum): any value
holding more than 1/bins of the reference gets an exact-value bin of its own, [v - tol, v + tol)
with tol = ATOM_TOLERANCE x max(1, |v|), and the rest of the channel is split by quantiles of what
remains. Plain quantiles there collapse edges (a dead one-bin channel) or merge the atom with its
neighbours, so noise far below one grey level moves the whole atom without moving any count.
A channel whose reference fills fewer than two bins cannot be tested: it carries `untestable`
(the reason) and the fleet leaves it out of the tests and of the multiple-testing count.

Optional keys (`exact`, `untestable`) keep the schema at /1: older agents ignore them and older
bundles, without them, load and bin exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.monitoring.channels import CLASS, MonitorPlan

SCHEMA = "edgekit.reference/1"
# Half-width of an exact-value bin, relative to max(1, |v|): far below any real change (pixel noise
# of sd 0.01 moves an atom by ~0.005) and far above float32/float64 disagreement between the build
# (training data in float64) and the agent (float32 inputs), which is ~1e-7 relative.
ATOM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ChannelReference:
    name: str
    kind: str
    edges: np.ndarray  # float64, (bins + 1,)
    counts: np.ndarray  # int64, (bins,)
    n: int
    mean: float
    std: float
    exact: tuple[float, ...] = ()  # values that have an exact-value bin of their own
    untestable: str | None = None  # why the channel cannot be tested, or None

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def testable(self) -> bool:
        return untestable_reason(self.counts) is None and self.untestable is None


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
                    **({"exact": list(c.exact)} if c.exact else {}),
                    **({"untestable": c.untestable} if c.untestable else {}),
                }
                for c in self.channels.values()
            },
        }

    def untestable(self) -> dict[str, str]:
        """Channel name -> why it is not tested (what `inspect`, the API and the dashboard list)."""
        out = {}
        for c in self.channels.values():
            reason = c.untestable or untestable_reason(c.counts)
            if reason:
                out[c.name] = reason
        return out

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
            untestable = c.get("untestable")
            channels[name] = ChannelReference(
                name, str(c["kind"]), edges, counts, int(c["n"]), float(c["mean"]), float(c["std"]),
                tuple(float(v) for v in c.get("exact", [])), None if untestable is None else str(untestable),
            )
        return cls(channels)


def untestable_reason(counts: np.ndarray) -> str | None:
    """Why reference `counts` give no test (fewer than two bins with reference mass), or None."""
    used = int((np.asarray(counts) > 0).sum())
    if used >= 2:
        return None
    return "no reference data" if used == 0 else "fewer than 2 usable bins: constant in the reference"


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


def point_mass_edges(values: np.ndarray, bins: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Edges with an exact-value bin for every value above 1/bins of the mass, quantiles elsewhere.

    Returns (edges, exact values). Edges are strictly increasing and every bin between them holds
    reference mass (empty bins, which quantiles of a lumpy channel leave, are merged away), so the
    bin count can end up below `bins`; a constant channel gets a single bin (untestable).
    """
    v = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if v.size == 0:
        return np.array([0.0, 1.0]), ()
    uniq, cnt = np.unique(v, return_counts=True)
    atoms = uniq[cnt > v.size / bins]
    tol = ATOM_TOLERANCE * np.maximum(1.0, np.abs(atoms))
    in_atom = np.zeros(v.size, dtype=bool)
    for a, t in zip(atoms, tol, strict=True):
        in_atom |= (v >= a - t) & (v < a + t)
    rest = v[~in_atom]
    interior: list[float] = []
    for a, t in zip(atoms, tol, strict=True):
        interior += [float(a - t), float(a + t)]
    if rest.size:
        k = max(bins - 2 * len(atoms), 1)  # an atom can split a quantile bin in two
        q = np.quantile(rest, np.linspace(0.0, 1.0, k + 1))[1:-1]
        inside = np.zeros(q.size, dtype=bool)
        for a, t in zip(atoms, tol, strict=True):
            inside |= (q >= a - t) & (q <= a + t)
        interior += q[~inside].tolist()
    cuts = np.unique(np.asarray(interior, dtype=np.float64))
    atom_edges = set(interior[: 2 * len(atoms)])
    while cuts.size:  # merge empty bins: drop a bounding cut, preferring a quantile cut to an atom's
        counts = np.bincount(np.searchsorted(cuts, v, side="right"), minlength=cuts.size + 1)
        empty = np.nonzero(counts == 0)[0]
        if not empty.size:
            break
        b = int(empty[0])
        candidates = [i for i in (b - 1, b) if 0 <= i < cuts.size]
        drop = next((i for i in candidates if float(cuts[i]) not in atom_edges), candidates[-1])
        cuts = np.delete(cuts, drop)
    while cuts.size + 1 > bins:  # many atoms (discrete data): merge the lightest neighbouring pair
        counts = np.bincount(np.searchsorted(cuts, v, side="right"), minlength=cuts.size + 1)
        pair = (counts[:-1] + counts[1:]).astype(np.float64)
        pair[[float(c) in atom_edges for c in cuts]] += v.size  # keep atoms' own bins while others can go
        cuts = np.delete(cuts, int(np.argmin(pair)))
    if not cuts.size:  # constant (or one atom plus nothing): one bin around the data
        half = max(abs(float(v[0])) * 1e-6, 1e-9)
        lo, hi = float(v[0]) - half, max(float(v[-1]), float(v[0])) + half
        return np.array([lo, hi]), tuple(float(a) for a in atoms)
    lo = float(v[0]) if v[0] < cuts[0] else float(cuts[0]) - float(tol.min(initial=1e-6))
    hi = float(v[-1]) if v[-1] > cuts[-1] else float(cuts[-1]) + float(tol.min(initial=1e-6))
    edges = np.concatenate([[lo], cuts, [hi]])
    return edges, tuple(float(a) for a in atoms)


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
        exact: tuple[float, ...] = ()
        if kind == CLASS:
            edges = class_edges(len(plan.labels))
        else:
            edges, exact = point_mass_edges(column, bins)
        counts = bin_counts(column, edges)
        channels[name] = ChannelReference(
            name, kind, edges, counts, len(column), float(np.mean(column)), float(np.std(column)),
            exact, untestable_reason(counts),
        )
    return Reference(channels)
