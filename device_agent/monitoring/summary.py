"""Window summaries: mergeable histograms of what a model saw and said (DESIGN.md section 6).

A `WindowSummary` is a value with `zero`, `update`, `merge` and `to_bytes`/`from_bytes`, in the
style of whylogs metrics: two summaries of the same model merge by adding, so the server can pool
windows across devices and time. The encoding is versioned (`edgekit.summary/1`); decoding checks
structure and types and raises `PayloadError` with a short `kind` that the fleet server counts.

Optional per-channel field `disp: [X, df, S, blocks - 1]` (added without a schema bump, so older servers accept
new payloads and payloads without it, such as tests/device_agent/data/summary_v1.json, still
ingest): the between-block chi-square of the window and its degrees of freedom, the dependence
signal of `device_agent.monitoring.dispersion`. Summaries that lack it are tested as independent draws.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.errors import PayloadError
from device_agent.monitoring.dispersion import BlockCounts, pit_scores
from device_agent.monitoring.reference import Reference

SCHEMA = "edgekit.summary/1"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_ZLIB = "application/json+zlib"
# A decoded payload larger than this is refused (protects the server from zlib bombs).
MAX_DECODED_BYTES = 4 * 1024 * 1024
# Every integer is stored as a signed 64-bit column (SQLite INTEGER, PostgreSQL BIGINT): a larger one
# passes JSON but fails the insert, so it is refused here, where the message can still be named.
INT64_MAX = 2**63 - 1


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

    # -- encoding -----------------------------------------------------------------------------

    def to_payload(self) -> dict[str, Any]:
        channels = {}
        disp = self.dispersion_statistic()
        for i, name in enumerate(self.channel_names):
            empty = self.n == 0
            channels[name] = {
                "counts": self.counts[i, : self.bins[i]].tolist(),
                "min": None if empty else _num(self.minimum[i]),
                "max": None if empty else _num(self.maximum[i]),
                "sum": _num(self.total[i]),
                "sumsq": _num(self.total_sq[i]),
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
        if self.confusion is not None:
            payload["labels"] = {
                "classes": list(self.label_names),
                "n": int(self.confusion.sum()),
                "confusion": self.confusion.tolist(),
            }
        return payload

    def to_bytes(self, *, compress: bool = True) -> tuple[bytes, str]:
        """Encoded payload and its MQTT 5 content type."""
        raw = json.dumps(self.to_payload(), separators=(",", ":")).encode("utf-8")
        if compress:
            return zlib.compress(raw, 6), CONTENT_TYPE_ZLIB
        return raw, CONTENT_TYPE_JSON

    @classmethod
    def from_payload(cls, payload: Any) -> WindowSummary:
        p = _check_payload(payload)
        names = list(p["channels"])
        bins = np.array([len(p["channels"][n]["counts"]) for n in names], dtype=np.int64)
        max_bins = int(bins.max()) if len(bins) else 1
        channels = [p["channels"][n] for n in names]
        counts = np.zeros((len(names), max_bins), dtype=np.int64)
        # One C-level fill for all channels (a row-by-row copy is most of the decoding time).
        counts[np.arange(max_bins)[None, :] < bins[:, None]] = np.fromiter(
            itertools.chain.from_iterable(c["counts"] for c in channels), dtype=np.int64, count=int(bins.sum()))
        minimum = np.full(len(names), np.inf)
        maximum = np.full(len(names), -np.inf)
        has_range = np.array([c.get("min") is not None for c in channels], dtype=bool)
        minimum[has_range] = [c["min"] for c in channels if c.get("min") is not None]
        maximum[has_range] = [c["max"] for c in channels if c.get("min") is not None]
        total = np.array([c.get("sum", 0.0) for c in channels], dtype=np.float64)
        total_sq = np.array([c.get("sumsq", 0.0) for c in channels], dtype=np.float64)
        labels = p.get("labels")
        dispersion = None
        if all("disp" in c for c in channels):  # all or nothing: a partial signal is no signal
            dispersion = np.array([c["disp"] for c in channels], dtype=np.float64).reshape(len(names), 4)
        return cls(
            fleet=str(p["fleet"]),
            device=str(p["device"]),
            model={k: str(v) for k, v in p["model"].items()},
            window_start=float(p["window"]["start"]),
            window_end=float(p["window"]["end"]),
            seq=int(p["window"].get("seq", 0)),
            channel_names=names,
            bins=bins,
            counts=counts,
            minimum=minimum,
            maximum=maximum,
            total=total,
            total_sq=total_sq,
            n=int(p["n"]),
            label_names=[str(c) for c in labels["classes"]] if labels else [],
            confusion=np.asarray(labels["confusion"], dtype=np.int64) if labels else None,
            dispersion=dispersion,
        )

    @classmethod
    def from_bytes(cls, data: bytes, content_type: str | None = CONTENT_TYPE_JSON, *,
                   fast_loads: Callable[[bytes], Any] | None = None) -> WindowSummary:
        return cls.from_payload(decode_payload(data, content_type, fast_loads=fast_loads))


def decode_payload(data: bytes, content_type: str | None, *,
                   fast_loads: Callable[[bytes], Any] | None = None) -> Any:
    """Bytes (plain or zlib JSON, by MQTT content type) to a JSON value, with a decoded-size limit.

    `fast_loads` (the fleet server passes orjson's) is tried first; what it refuses goes through the
    stdlib parser, which accepts NaN and huge integers so the checks can name the exact problem.
    """
    if content_type == CONTENT_TYPE_ZLIB:
        try:
            inflater = zlib.decompressobj()
            data = inflater.decompress(data, MAX_DECODED_BYTES + 1)
        except zlib.error as exc:
            raise PayloadError("bad_encoding", f"not valid zlib data: {exc}") from exc
        if len(data) > MAX_DECODED_BYTES or inflater.unconsumed_tail:
            raise PayloadError("too_large", f"decompresses to more than {MAX_DECODED_BYTES} bytes")
    elif content_type not in (None, "", CONTENT_TYPE_JSON):
        raise PayloadError("bad_encoding", f"unsupported content type {content_type!r}")
    if len(data) > MAX_DECODED_BYTES:
        raise PayloadError("too_large", f"payload is {len(data)} bytes")
    if fast_loads is not None:
        try:
            return fast_loads(data)
        except ValueError:
            pass
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError("malformed_json", str(exc)) from exc


def _add_optional(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or b is None:  # a merge with a window that has no signal has none for the whole
        return None
    total: np.ndarray = a + b
    return total


def _num(x: float) -> float | None:
    """JSON-safe float, rounded to 9 significant digits (enough for counts' moments, fewer bytes)."""
    return float(f"{x:.9g}") if np.isfinite(x) else None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX


# The strings of a payload that reach storage or a page, and how long each may be. A table, so a
# later schema version's optional fields add a row here. Each must be valid UTF-8 (no lone
# surrogate, which `json` decodes from "\\ud800" but no database can store) and hold no NUL
# (PostgreSQL TEXT cannot).
_STRINGS: tuple[tuple[str, Callable[[dict[str, Any]], list[Any]], int], ...] = (
    ("fleet", lambda p: [p["fleet"]], 128),
    ("device", lambda p: [p["device"]], 128),
    ("model", lambda p: list(p["model"].values()), 256),
    ("channels", lambda p: list(p["channels"]), 256),
    ("labels.classes", lambda p: list((p.get("labels") or {}).get("classes") or []), 256),
)


def _check_strings(p: dict[str, Any]) -> None:
    for where, values, limit in _STRINGS:
        found = values(p)
        if not set(map(type, found)) <= {str}:
            raise PayloadError("malformed", f"{where}: names must be strings")
        if any(len(v) > limit for v in found):
            raise PayloadError("strings", f"{where}: a name is longer than {limit} characters")
        joined = "".join(found)
        if "\x00" in joined:
            raise PayloadError("strings", f"{where}: a name holds a NUL character")
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError("strings", f"{where}: a name is not valid UTF-8 ({exc.reason})") from exc


def _all_counts(values: list[Any]) -> bool:
    """`_is_count` for every element, checked in C (type set, then min): the server's hot path."""
    return set(map(type, values)) <= {int} and min(values) >= 0


def _all_numbers_or_null(values: list[Any]) -> bool:
    present = [v for v in values if v is not None]
    if not set(map(type, present)) <= {int, float}:
        return False
    try:
        return all(map(math.isfinite, present))
    except OverflowError:
        return False


def _is_number(x: Any) -> bool:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)  # math, not numpy: this runs per value on the server's hot path
    except OverflowError:  # an int too large for a float
        return False


def _channels_ok(channels: dict[str, Any], n: int) -> bool:
    """Every channel well-formed, checked for all channels at once with C-level builtins.

    The fleet server decodes thousands of summaries a second; a per-value Python check is most of
    that cost. False means "look closer", not a verdict: `_check_channels_one_by_one` decides.
    """
    values = list(channels.values())
    if not set(map(type, values)) <= {dict}:
        return False
    lists = [c.get("counts") for c in values]
    if not set(map(type, lists)) <= {list} or not all(lists):
        return False
    if not _all_counts(list(itertools.chain.from_iterable(lists))):
        return False
    if set(map(sum, lists)) != {n}:
        return False
    stats = [c.get(k) for c in values for k in ("min", "max", "sum", "sumsq")]
    if not _all_numbers_or_null(stats):
        return False
    if [v is None for v in stats[0::4]] != [v is None for v in stats[1::4]]:  # min and max come together
        return False
    return _disp_ok([c["disp"] for c in values if "disp" in c])


def _disp_ok(disps: list[Any]) -> bool:
    """Every optional `disp` well-formed, in bulk (a per-channel check cost 55 us per payload)."""
    if not disps:
        return True
    if set(map(type, disps)) != {list} or set(map(len, disps)) != {4}:
        return False
    flat = list(itertools.chain.from_iterable(disps))
    if not set(map(type, flat[1::2])) <= {int}:  # df and k
        return False
    return _all_numbers_or_null(flat) and None not in flat and min(flat) >= 0


def _check_channels_one_by_one(channels: dict[str, Any], n: int) -> None:
    for name, c in channels.items():
        if not isinstance(c, dict) or not isinstance(c.get("counts"), list) or not c["counts"]:
            raise PayloadError("malformed", f"channel {name!r} needs a non-empty counts list")
        if not _all_counts(c["counts"]):
            raise PayloadError("counts", f"channel {name!r} counts must be non-negative integers")
        if sum(c["counts"]) != n:
            raise PayloadError("counts", f"channel {name!r} counts add up to {sum(c['counts'])}, n is {n}")
        for stat in ("min", "max", "sum", "sumsq"):
            if c.get(stat) is not None and not _is_number(c[stat]):
                raise PayloadError("malformed", f"channel {name!r} {stat} must be a finite number or null")
        if (c.get("min") is None) != (c.get("max") is None):
            raise PayloadError("malformed", f"channel {name!r} has a min without a max or a max without a min")
        _check_optional(name, c)


# Optional per-channel fields: name -> (check, message). Table-driven so new fields add one line.
_OPTIONAL_CHANNEL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "disp": (lambda d: isinstance(d, list) and len(d) == 4 and all(_is_number(v) and v >= 0 for v in d)
             and _is_count(d[1]) and _is_count(d[3]), "disp must be [X, df, S, k], non-negative, df and k integers"),
}


def _check_optional(name: str, c: dict[str, Any]) -> None:
    for key, (ok, message) in _OPTIONAL_CHANNEL_FIELDS.items():
        if key in c and not ok(c[key]):
            raise PayloadError("malformed", f"channel {name!r} {message}")


def _check_payload(p: Any) -> dict[str, Any]:
    """Structural checks every consumer needs; model-specific checks (edges) are the server's."""
    if not isinstance(p, dict):
        raise PayloadError("malformed", "payload is not a JSON object")
    if p.get("schema") != SCHEMA:
        raise PayloadError("schema", f"schema is {p.get('schema')!r}, expected {SCHEMA!r}")
    for key, typ in (("fleet", str), ("device", str), ("model", dict), ("window", dict), ("channels", dict)):
        if not isinstance(p.get(key), typ):
            raise PayloadError("malformed", f"'{key}' missing or not a {typ.__name__}")
    if not all(isinstance(p["model"].get(k), str) for k in ("name", "version", "sha256")):
        raise PayloadError("malformed", "model needs string name, version and sha256")
    w = p["window"]
    if not (_is_number(w.get("start")) and _is_number(w.get("end")) and w["end"] >= w["start"]):
        raise PayloadError("window", "window needs numeric start <= end")
    if not _is_count(w.get("seq", 0)):
        raise PayloadError("window", "window.seq must be an integer in [0, 2**63)")
    if not _is_count(p.get("n")):
        raise PayloadError("counts", "n must be an integer in [0, 2**63)")
    if not p["channels"]:
        raise PayloadError("malformed", "no channels")
    _check_strings(p)
    if not _channels_ok(p["channels"], p["n"]):  # one bulk check; the loop below only names the culprit
        _check_channels_one_by_one(p["channels"], p["n"])
    labels = p.get("labels")
    if labels is not None:
        if not isinstance(labels, dict) or not isinstance(labels.get("classes"), list):
            raise PayloadError("malformed", "labels needs a classes list")
        k = len(labels["classes"])
        m = labels.get("confusion")
        if not (isinstance(m, list) and len(m) == k and all(isinstance(r, list) and len(r) == k for r in m)):
            raise PayloadError("counts", f"labels.confusion must be {k}x{k}")
        if not all(_is_count(x) for r in m for x in r):
            raise PayloadError("counts", "confusion counts must be non-negative integers")
        if sum(map(sum, m)) > INT64_MAX:
            raise PayloadError("counts", "confusion counts add up to more than 2**63 - 1")
    return p
