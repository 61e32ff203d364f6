"""The wire form of a window summary: a versioned JSON document, plain or zlib, by MQTT content type.

`WindowSummary.to_payload` writes the document and `fields_from_payload` reads it back into constructor
arguments (this module never imports the value, so neither depends on the other's import); `encode`
and `decode_payload` map between the document and bytes (with a decoded-size limit against zlib bombs). The
document is checked by `summary_validation.check_payload` before any of it is used.

Optional per-channel field `disp: [X, df, S, blocks - 1]` (added without a schema bump, so older servers
accept new payloads and payloads without it, such as tests/device_agent/data/summary_v1.json, still
ingest): the between-block chi-square of the window and its degrees of freedom, the dependence signal of
`device_agent.monitoring.dispersion`. Summaries that lack it are tested as independent draws.
Optional top-level `n_eff` (also without a schema bump): n^2 / sum of squared multiplicities of
identical inputs (`device_agent.monitoring.repeats`), at most n.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.errors import PayloadError
from device_agent.monitoring.summary_validation import check_payload

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_ZLIB = "application/json+zlib"
# A decoded payload larger than this is refused (protects the server from zlib bombs).
MAX_DECODED_BYTES = 4 * 1024 * 1024


def encode(payload: dict[str, Any], *, compress: bool = True) -> tuple[bytes, str]:
    """Encoded document and its MQTT 5 content type."""
    raw = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    if compress:
        return zlib.compress(raw, 6), CONTENT_TYPE_ZLIB
    return raw, CONTENT_TYPE_JSON


def fields_from_payload(payload: Any) -> dict[str, Any]:
    """`WindowSummary` constructor arguments from a document, which is checked first."""
    p = check_payload(payload)
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
    labels = p.get("labels")
    dispersion = None
    if all("disp" in c for c in channels):  # all or nothing: a partial signal is no signal
        dispersion = np.array([c["disp"] for c in channels], dtype=np.float64).reshape(len(names), 4)
    return {
        "fleet": str(p["fleet"]),
        "device": str(p["device"]),
        "model": {k: str(v) for k, v in p["model"].items()},
        "window_start": float(p["window"]["start"]),
        "window_end": float(p["window"]["end"]),
        "seq": int(p["window"].get("seq", 0)),
        "channel_names": names,
        "bins": bins,
        "counts": counts,
        "minimum": minimum,
        "maximum": maximum,
        "total": np.array([c.get("sum", 0.0) for c in channels], dtype=np.float64),
        "total_sq": np.array([c.get("sumsq", 0.0) for c in channels], dtype=np.float64),
        "n": int(p["n"]),
        "label_names": [str(c) for c in labels["classes"]] if labels else [],
        "confusion": np.asarray(labels["confusion"], dtype=np.int64) if labels else None,
        "dispersion": dispersion,
        "n_eff": None if p.get("n_eff") is None else float(p["n_eff"]),
    }


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


def json_number(x: float) -> float | None:
    """JSON-safe float, rounded to 9 significant digits (enough for counts' moments, fewer bytes)."""
    return float(f"{x:.9g}") if np.isfinite(x) else None
