"""The `ort` backend's quantizer: ranges calibrated once, then any set of nodes and tensors kept float.

It implements both `Quantizer` and `NodeControl` (`edge_kit.compile.quantize`): the gate's fallback
rounds and tensor repairs and the search's variants (per-tensor weights, dense layers or the model's
edges in float) are all ORT runs from the same calibration ranges.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration import BatchedCalibrationReader, CalibrationSelection, compute_ranges, preset_for
from calibration.ranges import CalibrationRanges
from edge_kit.compile.coverage import COMPUTE_OPS, DENSE_OPS
from edge_kit.compile.fallback import FallbackUnit, fallback_units, tensor_units
from edge_kit.compile.float_tensors import keep_float, quantized_activations
from edge_kit.compile.quantize.ort import (
    build_host,
    prepare_for_quantization,
    quantize_ort,
    resolve_target,
    target_preset,
)
from edge_kit.config import QuantizeSection

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32
SQNR_SAMPLES = 32


@dataclass
class OrtQuantizer:
    """ORT static QDQ quantization with ranges calibrated once and reused by every round."""

    settings: QuantizeSection
    fp32_path: Path
    workdir: Path
    ranges: CalibrationRanges
    backend: str = "ort"
    _units: list[FallbackUnit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    probe: np.ndarray | None = None  # a few preprocessed calibration samples for the SQNR signal
    requested_target: str = ""  # as configured ("auto" or a preset); settings.target is the resolved preset
    _plain: dict[tuple[tuple[str, ...], bool], Path] = field(default_factory=dict)  # ORT's output per node set

    @property
    def units(self) -> list[FallbackUnit]:
        return self._units

    @property
    def node_control(self) -> OrtQuantizer:
        return self  # ORT keeps any node or tensor float on request

    def tensor_units(self, int8_path: Path) -> list[FallbackUnit]:
        """The quantized activations of a model this quantizer made: each can be kept float on its own."""
        return tensor_units(onnx.load(str(int8_path)))

    def prefilter(self, int8_path: Path, units: list[FallbackUnit]) -> list[FallbackUnit]:
        """Order units worst-SQNR first (for models with more units than the gate trials one by one)."""
        if self.probe is None:
            return units
        from edge_kit.compile.sqnr import order_by_sqnr

        return order_by_sqnr(self.fp32_path, int8_path, units, self.probe)

    def quantize(self, excluded: tuple[str, ...], tag: str, float_tensors: tuple[str, ...] = ()) -> Path:
        return self.quantize_variant(excluded, self.settings.per_channel, tag, float_tensors)

    def quantize_variant(self, excluded: tuple[str, ...], per_channel: bool, tag: str,
                         float_tensors: tuple[str, ...] = ()) -> Path:
        """A candidate: the same ranges, a weight granularity, nodes kept fp32 and tensors kept float.

        ORT's output depends only on the fp32 model, the ranges, the granularity and the excluded nodes,
        so it is made once per such set: every tensor trial of the gate starts from round 0's model.
        """
        key = (tuple(sorted(excluded)), per_channel)
        plain = self._plain.get(key)
        if plain is None:
            plain = self.workdir / f"ort-{len(self._plain)}.onnx"
            quantize_ort(self.fp32_path, plain, self.ranges, target=self.settings.target, per_channel=per_channel,
                         nodes_to_exclude=excluded)
            self._plain[key] = plain
        out = self.workdir / f"int8-{tag}.onnx"
        if float_tensors:
            onnx.save(keep_float(onnx.load(str(plain)), float_tensors), str(out))
        else:
            shutil.copyfile(plain, out)
        return out

    def dense_nodes(self) -> tuple[str, ...]:
        """Fully connected layers (Gemm/MatMul) with the nodes that keep their outputs float."""
        return tuple(m for u in self._units if u.op_type in DENSE_OPS for m in u.members)

    def first_layer(self) -> str | None:
        """The first compute layer (Conv/Gemm/MatMul) in graph order: the one reading the model's input."""
        return next((u.node for u in self._units if u.op_type in COMPUTE_OPS), None)

    def output_tensors(self, int8_path: Path) -> tuple[str, ...]:
        """The graph outputs that a model this quantizer made quantizes (their Q/DQ pair can be dropped)."""
        model = onnx.load(str(int8_path))
        outputs = {o.name for o in model.graph.output}
        return tuple(t.name for t in quantized_activations(model) if t.name in outputs)

    def describe(self) -> dict[str, Any]:
        preset = target_preset(self.settings.target)
        return {
            "backend": "ort",
            "format": "QDQ",
            "per_channel": self.settings.per_channel,
            "target": preset.name,
            "activation_type": preset.activation_type.name,
            "weight_type": preset.weight_type.name,
            "reduce_range": preset.reduce_range,
            "target_why": preset.why,
            "target_requested": self.requested_target or preset.name,
            "host": build_host(),
        }


def make_ort_quantizer(
    settings: QuantizeSection,
    fp32_onnx: Path,
    workdir: Path,
    calibration_raw: np.ndarray,
    selection: CalibrationSelection,
    preprocess: Any,
) -> OrtQuantizer:
    """Pre-process the fp32 model, calibrate it once on the selected training samples."""
    workdir.mkdir(parents=True, exist_ok=True)
    target, warning = resolve_target(settings.target)
    requested = settings.target
    settings = dataclasses.replace(settings, target=target)
    prepared, notes = prepare_for_quantization(fp32_onnx, workdir / "fp32-prepared.onnx")
    model = onnx.load(str(prepared))
    input_name = model.graph.input[0].name
    reader = BatchedCalibrationReader(calibration_raw, input_name, batch_size=CALIBRATION_BATCH,
                                      preprocess=preprocess, ids=selection.ids)
    ranges = compute_ranges(prepared, reader, preset_for(settings.calibration), workdir / "calibration.json")
    head = np.asarray(calibration_raw[:SQNR_SAMPLES])
    probe = np.asarray(preprocess(head) if preprocess is not None else head, dtype=np.float32)
    if warning:
        log.warning("%s", warning)
        notes = [*notes, warning]
    return OrtQuantizer(settings, prepared, workdir, ranges, _units=fallback_units(model), notes=notes,
                        probe=probe, requested_target=requested)
