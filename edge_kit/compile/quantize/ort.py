"""Backend `ort`: ONNX Runtime static quantization, QDQ format, after ORT's own pre-processing.

The ranges come from `calibration.compute_ranges` (ORT's calibration cache), so re-quantizing with
a different set of fp32 nodes, as each fallback round of the gate does, costs no calibration.
Given the same fp32 model and the same ranges, the output bytes are identical run to run.

The output is ORT's own, unedited: an earlier post-pass removed all-zero weight/bias zero points
(2.5% of a MobileNetV2's file) but stopped ORT fusing Gemm into QGemm, so a float Gemm and a
per-inference weight dequantization ran instead (+3.6 to 4.7 ms of 53 to 67 ms at batch 1 on an
AVX2-only AMD EPYC). No post-pass goes here unless ORT's optimized graph keeps the same int8
kernels with it (`edge_kit.compile.fusion.fused_int8_ops`; tested with a Linear head).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from calibration.ranges import CalibrationRanges, quantizable_op_types
from edge_kit.compile.global_pooling import rewrite_global_pooling
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


# The preset whose kernels this host's best int8 instruction set runs (device_agent.host.int8_isa).
ISA_TARGETS = {
    "AMX-INT8": "x86-vnni", "AVX-512 VNNI": "x86-vnni", "AVX-VNNI": "x86-vnni",
    "AVX-512BW (no VNNI)": "x86-avx2", "AVX2 (no VNNI)": "x86-avx2",
    "Arm i8mm": "arm64", "Arm dot product": "arm64",
}


def host_target(isa: str | None = None) -> str:
    """The preset for the build host: the one its int8 kernels are gated and timed with."""
    from device_agent.host import int8_isa

    found = int8_isa() if isa is None else isa
    if found in ISA_TARGETS:
        return ISA_TARGETS[found]
    return "arm64" if platform.machine().lower() in ("aarch64", "arm64") else "x86-avx2"


def build_host() -> dict[str, Any]:
    """The machine the gate measured on (and the candidates were timed on): its int8 kernels decide both."""
    from device_agent.host import host_info

    info = host_info(packages=("onnxruntime",))
    return {k: info[k] for k in ("cpu", "machine", "cores", "int8_isa", "isa_flags", "packages")}


def resolve_target(name: str, isa: str | None = None) -> tuple[str, str | None]:
    """(preset name, warning or None): `auto` becomes the host's preset; a preset for other CPUs is
    kept, with a warning, because the gate and the timings measure this host's kernels, not the device's
    (an x86-vnni model gated on AVX2 measures saturation a VNNI device would not have; the reverse misses it)."""
    here = host_target(isa)
    if name == "auto":
        return here, None
    target_preset(name)
    if name == here:
        return name, None
    return name, (f"quantize.target {name!r} does not match this build host (int8 ISA "
                  f"{isa or _host_isa()}, preset {here!r}): the gate's accuracy and the timings are this "
                  f"host's, not the target device's; build on the target's kind of CPU or set target = \"auto\"")


def _host_isa() -> str:
    from device_agent.host import int8_isa

    return int8_isa()


def target_preset(name: str) -> TargetPreset:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown quantization target {name!r}", hint=f"allowed: {', '.join(TARGETS)}") from None


def prepare_for_quantization(fp32_path: str | Path, out_path: str | Path) -> tuple[Path, list[str]]:
    """ORT's recommended pre-processing (symbolic shape inference, graph optimisation, shape inference),
    then spatial ReduceMean -> GlobalAveragePool (`edge_kit.compile.global_pooling`).

    ORT's symbolic shape inference does not know every op; when it fails, the step is redone
    without it (ONNX's own shape inference still runs) and the returned notes say so.
    """
    out = Path(out_path)
    notes: list[str] = []
    try:
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=False)
    except Exception as exc:
        log.warning("ORT symbolic shape inference failed (%s: %s); pre-processing without it",
                    type(exc).__name__, exc)
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
        notes.append(f"ORT's symbolic shape inference failed ({type(exc).__name__}); "
                     "pre-processed with ONNX shape inference only")
    model, pooled = rewrite_global_pooling(onnx.load(str(out)))
    if pooled:  # so the pooling gets an int8 kernel (QLinearGlobalAveragePool) like a TorchScript export's
        onnx.save(model, str(out))
        log.info("spatial ReduceMean rewritten as GlobalAveragePool: %s", ", ".join(pooled))
    return out, notes


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
    return QuantizedModel(out, "ort", target, per_channel, tuple(sorted(nodes_to_exclude)))
