"""The quantize stage: what a quantizer offers the gate and the search, and which backend makes it.

A `Quantizer` turns "these nodes stay fp32" into an int8 ONNX file. The gate drives it; the
quantizer knows nothing about budgets. Backends: `ort` (ONNX Runtime static QDQ, default;
`ort_quantizer.OrtQuantizer`) and `inc` (Intel Neural Compressor's PyTorch path, `inc.IncQuantizer`).
A backend that can keep single nodes and tensors float offers it as `node_control` (the gate's tensor
repairs, the search's variants); one that cannot (inc: its autotune already chose) has None there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from calibration import CalibrationSelection
from edge_kit.compile.fallback import FallbackUnit
from edge_kit.config import Config


class NodeControl(Protocol):
    """Per-node and per-tensor control over the int8 model, for backends that have it."""

    def quantize_variant(self, excluded: tuple[str, ...], per_channel: bool, tag: str,
                         float_tensors: tuple[str, ...] = ()) -> Path: ...

    def tensor_units(self, int8_path: Path) -> list[FallbackUnit]: ...

    def prefilter(self, int8_path: Path, units: list[FallbackUnit]) -> list[FallbackUnit]: ...

    def dense_nodes(self) -> tuple[str, ...]: ...

    def first_layer(self) -> str | None: ...

    def output_tensors(self, int8_path: Path) -> tuple[str, ...]: ...


class Quantizer(Protocol):
    backend: str
    fp32_path: Path  # the fp32 model the int8 candidates are compared with

    @property
    def units(self) -> list[FallbackUnit]: ...

    @property
    def node_control(self) -> NodeControl | None: ...

    def quantize(self, excluded: tuple[str, ...], tag: str, float_tensors: tuple[str, ...] = ()) -> Path: ...

    def describe(self) -> dict[str, Any]: ...

    @property
    def notes(self) -> list[str]: ...


def calibration_inputs(x_train_raw: np.ndarray, selection: CalibrationSelection) -> np.ndarray:
    return np.asarray(x_train_raw[selection.positions])


def make_quantizer(backend: str, config: Config, dataset: Any, trained: Any, selection: CalibrationSelection,
                   workdir: Path) -> Quantizer:
    """The configured backend's quantizer, calibrated on the selected training samples."""
    raw = calibration_inputs(dataset.X_train, selection)
    if not np.isfinite(np.asarray(raw, dtype=np.float64)).all():
        from calibration import CalibrationError

        raise CalibrationError("calibration data (training split) holds NaN or inf values",
                               hint="clean the data snapshot; calibration never skips samples silently")
    if backend == "inc":
        from edge_kit.compile.quantize.inc import make_inc_quantizer

        return make_inc_quantizer(config, trained, dataset, raw, workdir)
    from edge_kit.compile.quantize.ort_quantizer import make_ort_quantizer

    return make_ort_quantizer(config.quantize, Path(trained.onnx), workdir, raw, selection, dataset.preprocess)
