"""A cheap culprit signal: per-tensor signal-to-quantization-noise ratio over ORT's qdq_loss_debug.

Used to order the fallback units when a model has too many for a trial each: the layers whose
output loses the most in its own Q/DQ step (lowest SQNR, in dB) are trialled first.

The SQNR is taken over the bulk of each tensor (values up to the 99th percentile of magnitude):
the classic int8 failure is a few huge outliers stretching the range until the typical values
round to zero, and a plain SQNR misses exactly that, because the outliers dominate the signal
power and survive quantization well.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)

from edge_kit.compile.fallback import FallbackUnit


class _ArrayReader(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, batch: int = 16) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        out = {self.name: np.ascontiguousarray(self.x[self.i : self.i + self.batch], dtype=np.float32)}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


BULK_QUANTILE = 0.99


def bulk_sqnr(reference: list[np.ndarray], quantized: list[np.ndarray]) -> float:
    """SQNR in dB of `quantized` vs `reference` over the reference values up to the 99th percentile."""
    x = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in reference])
    y = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in quantized])
    keep = np.abs(x) <= np.quantile(np.abs(x), BULK_QUANTILE)
    signal = float(np.linalg.norm(x[keep]))
    noise = float(np.linalg.norm(x[keep] - y[keep]))
    if signal == 0.0:
        return float("inf")
    return 20.0 * float(np.log10(signal / max(noise, 1e-30)))


def tensor_sqnr(fp32_path: Path, int8_path: Path, inputs: np.ndarray) -> dict[str, float]:
    """SQNR (dB) of every quantized activation: its fp32 value vs after its own quantize/dequantize."""
    name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="edgekit-sqnr-") as tmp:
        f_aug, q_aug = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(fp32_path), str(f_aug))
        modify_model_output_intermediate_tensors(str(int8_path), str(q_aug))
        f_act = collect_activations(str(f_aug), _ArrayReader(name, inputs))
        q_act = collect_activations(str(q_aug), _ArrayReader(name, inputs))
    errors = compute_activation_error(create_activation_matching(q_act, f_act), err_func=bulk_sqnr)
    return {t: float(e["qdq_err"]) for t, e in errors.items() if np.isfinite(e.get("qdq_err", np.nan))}


def order_by_sqnr(fp32_path: Path, int8_path: Path, units: list[FallbackUnit],
                  inputs: np.ndarray) -> list[FallbackUnit]:
    """Units (layers and tensors) sorted by the lowest SQNR among the tensors they keep in float; unknown last."""
    sqnr = tensor_sqnr(fp32_path, int8_path, inputs)
    outputs = {n.name: list(n.output) for n in onnx.load(str(fp32_path), load_external_data=False).graph.node}

    def score(unit: FallbackUnit) -> float:
        tensors = [*unit.tensors, *(t for member in unit.members for t in outputs.get(member, []))]
        values = [sqnr[t] for t in tensors if t in sqnr]
        return min(values) if values else float("inf")

    return sorted(units, key=score)
