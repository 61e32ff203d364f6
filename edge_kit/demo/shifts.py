"""Input shifts for the simulated devices, ramped in gradually like real drift.

All of them act on RAW digits (8x8 images, pixel values 0..16) before the agent sees them, so the agent
preprocesses and monitors them exactly as it would field data:
- `noise`: Gaussian sensor noise (sd 5 pixel units at full severity), clipped to 0..16;
- `translate`: the image moved right by up to 2 pixels (a camera knocked out of place);
- `classmix`: a changed class mix: at full severity 80% of samples are 0s and 1s (a new site).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("none", "noise", "translate", "classmix")
NOISE_SD = 5.0
MAX_SHIFT_PIXELS = 2
CLASSMIX_CLASSES = (0, 1)
CLASSMIX_FRACTION = 0.8


@dataclass(frozen=True)
class Shift:
    """`kind` ramps in from `start_s` seconds after the feed starts, reaching full severity `ramp_s` later."""

    kind: str = "none"
    start_s: float = 0.0
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown shift {self.kind!r}; one of {', '.join(KINDS)}")

    def severity(self, elapsed_s: float) -> float:
        if self.kind == "none" or elapsed_s < self.start_s:
            return 0.0
        if self.ramp_s <= 0:
            return 1.0
        return float(min(1.0, (elapsed_s - self.start_s) / self.ramp_s))


def sample_batch(x: np.ndarray, y: np.ndarray, size: int, shift: Shift, severity: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A batch of raw held-out samples with their labels, shifted at `severity` (0 = untouched)."""
    if shift.kind == "classmix" and severity > 0:
        favoured = np.flatnonzero(np.isin(y, CLASSMIX_CLASSES))
        take_favoured = rng.random(size) < CLASSMIX_FRACTION * severity
        idx = np.where(take_favoured, rng.choice(favoured, size), rng.integers(0, len(x), size))
    else:
        idx = rng.integers(0, len(x), size)
    batch = np.array(x[idx], dtype=np.float32)
    labels = y[idx]
    if severity <= 0:
        return batch, labels
    if shift.kind == "noise":
        batch = np.clip(batch + rng.normal(0.0, NOISE_SD * severity, batch.shape), 0, 16).astype(np.float32)
    elif shift.kind == "translate":
        pixels = round(MAX_SHIFT_PIXELS * severity)
        if pixels:
            moved = np.zeros_like(batch)
            moved[..., pixels:] = batch[..., :-pixels]
            batch = moved
    return batch, labels
