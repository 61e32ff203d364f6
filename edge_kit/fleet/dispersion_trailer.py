"""The agent's dispersion signal (X, df, S, k per channel) stored beside a window's counts.

No schema change: the signal travels as a trailer of the stored counts blob, float32 (channels x
FIELDS) in reference channel order, then the channel count (uint32) and a marker. A blob without the
marker (windows stored before, or from agents that do not send it) reads as "no signal", and the
tests treat that window as independent draws, as they always did. `storage.decode_counts` strips
the trailer, so code that reads counts never sees it.

The design effect of exact repeats (n / n_eff, from the summary's optional `n_eff`) travels the same
way, as a second trailer after it: float32 then its own marker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_kit.fleet.stats import dispersion_factor

MARKER = b"\x00EKdsp1\x00"
FIELDS = 4  # X, df, S, k: device_agent/monitoring/dispersion.py
_WIDTHS = (2, 4, 8)  # the count item sizes `storage.encode_counts` uses
REPEATS_MARKER = b"\x00EKrep1\x00"
_REPEATS_SIZE = 4 + len(REPEATS_MARKER)


def attach(counts_blob: bytes, dispersion: np.ndarray | None) -> bytes:
    """`counts_blob` + float32 (channels, FIELDS) + uint32 channels + marker; unchanged without a signal."""
    if dispersion is None:
        return counts_blob
    d = np.ascontiguousarray(dispersion, dtype="<f4")
    return counts_blob + d.tobytes() + np.uint32(len(d)).astype("<u4").tobytes() + MARKER


def attach_repeats(blob: bytes, design_effect: float | None) -> bytes:
    """`blob` (counts, maybe with a dispersion trailer) + float32 design effect of repeats + marker."""
    if design_effect is None:
        return blob
    return blob + np.float32(design_effect).astype("<f4").tobytes() + REPEATS_MARKER


def _repeats_trailer(blob: bytes, bins: int) -> int:
    """Length of a repeats trailer at the end of `blob` (0 when there is none)."""
    if not blob.endswith(REPEATS_MARKER) or len(blob) < _REPEATS_SIZE:
        return 0
    rest = blob[: len(blob) - _REPEATS_SIZE]
    return _REPEATS_SIZE if len(rest) in {w * bins for w in _WIDTHS} or _trailer(rest, bins) else 0


def split_repeats(blobs: Sequence[bytes], bins: int) -> tuple[list[bytes], np.ndarray]:
    """Blobs without a repeats trailer, and the (W,) design effects of repeats (NaN where none)."""
    out = np.full(len(blobs), np.nan)
    plain: list[bytes] = []
    for i, blob in enumerate(blobs):
        size = _repeats_trailer(blob, bins)
        if size:
            out[i] = float(np.frombuffer(blob[-size : -len(REPEATS_MARKER)], dtype="<f4")[0])
            blob = blob[:-size]
        plain.append(blob)
    return plain, out


def _trailer(blob: bytes, bins: int) -> int:
    """Length of a dispersion trailer at the end of `blob` (0 when there is none)."""
    if not blob.endswith(MARKER) or len(blob) < len(MARKER) + 4:
        return 0
    channels = int(np.frombuffer(blob[-len(MARKER) - 4 : -len(MARKER)], dtype="<u4")[0])
    size = 4 * FIELDS * channels + 4 + len(MARKER)
    return size if len(blob) - size in {w * bins for w in _WIDTHS} else 0


def strip(blob: bytes, bins: int) -> bytes:
    """The counts part of a stored blob (what `storage.decode_counts` reads)."""
    repeats = _repeats_trailer(blob, bins)
    if repeats:
        blob = blob[:-repeats]
    size = _trailer(blob, bins)
    return blob[: len(blob) - size] if size else blob


def split(blobs: Sequence[bytes], bins: int, channels: int) -> tuple[list[bytes], np.ndarray]:
    """Counts blobs without trailers, and (W, channels, FIELDS) signals (NaN where a window has none)."""
    out = np.full((len(blobs), channels, FIELDS), np.nan)
    plain: list[bytes] = []
    for i, blob in enumerate(blobs):
        size = _trailer(blob, bins)
        if size == 4 * FIELDS * channels + 4 + len(MARKER):
            start = len(blob) - size
            out[i] = np.frombuffer(blob[start : start + 4 * FIELDS * channels], dtype="<f4").reshape(channels, FIELDS)
        plain.append(blob[: len(blob) - size] if size else blob)
    return plain, out


def window_phi(dispersion: np.ndarray) -> np.ndarray:
    """(W, C) design effect per window from (W, C, FIELDS) signals (1 where there is no signal).

    The larger of the average (X / df) and the location (S / k) design effect: KS reacts to the
    location direction first, and dividing chi-square by the larger one too keeps it conservative.
    """
    return np.maximum(dispersion_factor(dispersion[..., 0], dispersion[..., 1]),
                      dispersion_factor(dispersion[..., 2], dispersion[..., 3]))
