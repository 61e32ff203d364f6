"""fp32 ONNX export with a dynamic batch dimension, checked against PyTorch with ONNX Runtime.

The exported graph takes the PREPROCESSED float32 batch named `input`, shaped (batch, *input_shape),
and returns `logits`. Right after export it is run with ONNX Runtime on held-out inputs, at two batch
sizes (so the batch dimension is proven dynamic), and compared with the PyTorch model: the largest
absolute difference is reported, and the export fails above the tolerance.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from device_agent.atomic import atomic_write_bytes
from edge_kit.errors import EdgeKitError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18
DEFAULT_TOLERANCE = 1e-4


class ExportMismatchError(EdgeKitError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    tolerance: float
    samples: int
    opset: int

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "samples": self.samples, "opset": self.opset}


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """Write ``model`` (eval mode, on CPU) as fp32 ONNX with a dynamic batch dimension, atomically."""
    model = model.to("cpu").eval()
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter warns about things that do not apply to inference
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, verbose=False,
            )
        if program is None:
            raise EdgeKitError("torch.onnx.export returned no program")
        with tempfile.TemporaryDirectory(prefix="edgekit-export-") as scratch:
            written = Path(scratch) / path.name  # the exporter saves to a path only: published from here
            program.save(str(written), external_data=False)
            data = written.read_bytes()
    except EdgeKitError:
        raise
    except Exception as exc:  # the exporter raises many types; the model is the user's
        raise EdgeKitError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           hint="run with --debug for the exporter's full report") from exc
    atomic_write_bytes(path, data)
    return path


def onnx_logits(path: Path, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32)
        outputs.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    return np.concatenate(outputs, axis=0)


def torch_logits(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    model = model.to("cpu").eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))).numpy()


def check_parity(model: torch.nn.Module, path: Path, inputs: np.ndarray,
                 tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Compare ONNX Runtime with PyTorch on ``inputs`` (preprocessed); ExportMismatchError above ``tolerance``."""
    if len(inputs) == 0:
        raise EdgeKitError("no held-out inputs to check the ONNX export against")
    expected = torch_logits(model, inputs)
    # Batch of one and a larger batch: a batch dimension frozen at export time fails one of them.
    diffs = [float(np.max(np.abs(onnx_logits(path, inputs, bs) - expected))) for bs in (1, 64)]
    max_diff = max(diffs)
    result = ExportResult(path, max_diff, tolerance, len(inputs), OPSET)
    if not max_diff <= tolerance:  # also catches NaN
        raise ExportMismatchError(
            f"ONNX export {path.name} disagrees with PyTorch: max abs difference {max_diff:.3g} "
            f"over {len(inputs)} held-out inputs exceeds the tolerance {tolerance:g}",
            hint="an operator is exported incorrectly; run with --debug and check the model for unsupported ops",
        )
    log.info("ONNX parity: max abs difference %.3g over %d held-out inputs (tolerance %g)",
             max_diff, len(inputs), tolerance)
    return result


def export_and_check(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path, held_out: np.ndarray,
                     tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    export_onnx(model, input_shape, path)
    try:
        return check_parity(model, path, held_out, tolerance)
    except ExportMismatchError:
        # A model that disagrees must not be picked up later as if it were checked.
        path.rename(path.with_suffix(".rejected.onnx"))
        raise
