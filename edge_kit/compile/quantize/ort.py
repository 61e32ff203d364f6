"""Backend `ort`: ONNX Runtime static quantization, QDQ format, after ORT's own pre-processing.

The ranges come from `calibration.compute_ranges` (ORT's calibration cache), so re-quantizing with
a different set of fp32 nodes, as each fallback round of the gate does, costs no calibration.
Given the same fp32 model and the same ranges, the output bytes are identical run to run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from calibration.ranges import CalibrationRanges, quantizable_op_types
from edge_kit.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetPreset:
    """Quantization types for one family of CPUs."""

    name: str
    activation_type: QuantType
    weight_type: QuantType
    reduce_range: bool
    why: str
    extra_options: dict[str, Any] = field(default_factory=dict)


TARGETS: dict[str, TargetPreset] = {
    "x86-vnni": TargetPreset(
        "x86-vnni", QuantType.QUInt8, QuantType.QInt8, False,
        "u8 activations x s8 weights map onto VNNI's vpdpbusd with no saturation risk",
    ),
    "x86-avx2": TargetPreset(
        "x86-avx2", QuantType.QUInt8, QuantType.QInt8, True,
        "7-bit weights (reduce_range): AVX2's vpmaddubsw saturates int16 sums of two u8 x s8 products",
    ),
    "arm64": TargetPreset(
        "arm64", QuantType.QInt8, QuantType.QInt8, False,
        "signed int8 activations: Arm's sdot/smmla kernels are s8 x s8",
    ),
}


def target_preset(name: str) -> TargetPreset:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown quantization target {name!r}", hint=f"allowed: {', '.join(TARGETS)}") from None


def prepare_for_quantization(fp32_path: str | Path, out_path: str | Path) -> tuple[Path, list[str]]:
    """ORT's recommended pre-processing: symbolic shape inference, graph optimisation, shape inference.

    ORT's symbolic shape inference does not know every op; when it fails, the step is redone
    without it (ONNX's own shape inference still runs) and the returned notes say so.
    """
    out = Path(out_path)
    try:
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=False)
        return out, []
    except Exception as exc:
        log.warning("ORT symbolic shape inference failed (%s: %s); pre-processing without it",
                    type(exc).__name__, exc)
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
        return out, [f"ORT's symbolic shape inference failed ({type(exc).__name__}); "
                     "pre-processed with ONNX shape inference only"]


@dataclass(frozen=True)
class QuantizedModel:
    """An int8 candidate: where it is and how it was made."""

    path: Path
    backend: str
    target: str
    per_channel: bool
    excluded_nodes: tuple[str, ...]


def quantize_ort(
    prepared_path: str | Path,
    out_path: str | Path,
    ranges: CalibrationRanges,
    *,
    target: str,
    per_channel: bool,
    nodes_to_exclude: tuple[str, ...] = (),
) -> QuantizedModel:
    """Quantize a pre-processed fp32 model with cached calibration ranges; nodes_to_exclude stay fp32."""
    preset = target_preset(target)
    out = Path(out_path)
    known = {n.name for n in onnx.load(str(prepared_path), load_external_data=False).graph.node}
    unknown = sorted(set(nodes_to_exclude) - known)
    if unknown:
        raise UsageError(f"nodes to keep in fp32 are not in the model: {', '.join(unknown)}")
    quantize_static(
        str(prepared_path),
        str(out),
        calibration_data_reader=None,
        calibration_cache_path=str(ranges.cache_path),
        calibrate_method=ranges.preset.method,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=quantizable_op_types(),
        per_channel=per_channel,
        reduce_range=preset.reduce_range,
        activation_type=preset.activation_type,
        weight_type=preset.weight_type,
        nodes_to_exclude=sorted(nodes_to_exclude),
        extra_options=dict(preset.extra_options),
    )
    model = onnx.load(str(out))
    if drop_zero_zero_points(model):
        onnx.save(model, str(out))
    return QuantizedModel(out, "ort", target, per_channel, tuple(sorted(nodes_to_exclude)))


def drop_zero_zero_points(model: onnx.ModelProto) -> int:
    """Remove all-zero zero points of int8/int32 DequantizeLinear inputs (the ONNX default is 0).

    Symmetric int8 weights and int32 biases get one zero point per channel from ORT's quantizer:
    about 2.5% of a MobileNetV2's int8 size, all zeros. The outputs are bit-identical without them
    and ORT still fuses the int8 kernels. Returns how many were dropped.
    """
    inits = {t.name: t for t in model.graph.initializer}
    dropped = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3 or node.input[2] not in inits:
            continue
        zero_point = inits[node.input[2]]
        if zero_point.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT32):
            continue
        if numpy_helper.to_array(zero_point).any():
            continue
        del node.input[2]
        dropped += 1
    if dropped:
        used = {name for node in model.graph.node for name in node.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return dropped
