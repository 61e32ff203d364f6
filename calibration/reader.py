"""A streaming CalibrationDataReader: raw samples in, preprocessed batches out, bounded memory.

Only one preprocessed batch exists at a time, so calibrating on a large selection does not hold a
second, preprocessed copy of it in memory. Every batch is checked for NaN/inf before ONNX Runtime
sees it: a non-finite value would silently poison the min/max (or histogram) of every tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.errors import CalibrationError

Preprocess = Callable[[np.ndarray], np.ndarray]


class BatchedCalibrationReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no types
    def __init__(
        self,
        raw: np.ndarray,
        input_name: str,
        *,
        batch_size: int = 32,
        preprocess: Preprocess | None = None,
        ids: tuple[str, ...] | None = None,
    ) -> None:
        if len(raw) == 0:
            raise CalibrationError("the calibration set is empty: no samples to calibrate on")
        if batch_size < 1:
            raise CalibrationError(f"calibration batch size must be at least 1, got {batch_size}")
        self._raw = raw
        self._input_name = input_name
        self._batch_size = batch_size
        self._preprocess = preprocess
        self._ids = ids
        self._start = 0

    def __len__(self) -> int:
        return -(-len(self._raw) // self._batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self._raw):
            return None
        stop = self._start + self._batch_size
        raw = np.asarray(self._raw[self._start : stop])
        batch = self._preprocess(raw) if self._preprocess is not None else raw
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not np.isfinite(batch).all():
            bad = int(np.argwhere(~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1))[0][0])
            where = self._ids[self._start + bad] if self._ids else f"row {self._start + bad}"
            raise CalibrationError(f"calibration data holds NaN or inf (sample {where})",
                                   hint="clean the training data; calibration never skips bad samples silently")
        self._start = stop
        return {self._input_name: batch}

    def rewind(self) -> None:
        self._start = 0
