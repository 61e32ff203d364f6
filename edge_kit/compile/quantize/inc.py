"""Backend `inc`: Intel Neural Compressor 3.x, PyTorch (pt2e) path, exported to a QDQ ONNX model.

INC 3.x no longer quantizes ONNX models, so this backend starts from the pipeline's checkpoint:
`neural_compressor.torch.export.export` captures the model, `autotune` tries static int8 configs
(symmetric/asymmetric activations x KL/minmax ranges) with `prepare`/`convert` until one loses no
more than the gate's budget, and `torch.onnx.export(..., dynamo=True)` writes the QDQ graph that
ONNX Runtime runs. The result then goes through the same gate and bundle as the `ort` backend.

INC's pt2e path uses the X86 Inductor quantizer (u8 activations, s8 weights), so this backend is
for the x86 targets; `arm64` needs the `ort` backend. The weights of the exported graph arrive as
float initializers behind QuantizeLinear; they are folded into int8 initializers here, so the
bundled model is as small as the `ort` one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_kit.compile.fallback import FallbackUnit
from edge_kit.config import Config
from edge_kit.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32


@dataclass
class IncQuantizer:
    """One autotuned INC model; INC's own search replaces the per-node fallback of the `ort` backend."""

    fp32_path: Path
    int8_path: Path
    details: dict[str, Any]
    backend: str = "inc"
    notes: list[str] = field(default_factory=list)

    @property
    def units(self) -> list[FallbackUnit]:
        return []  # ONNX node names do not map back to INC's torch modules; autotune already searched

    @property
    def node_control(self) -> None:
        return None  # its one autotuned model: no node or tensor can be kept float afterwards

    def quantize(self, excluded: tuple[str, ...], tag: str, float_tensors: tuple[str, ...] = ()) -> Path:
        if excluded or float_tensors:
            raise UsageError("the inc backend cannot keep individual ONNX nodes or tensors in fp32")
        return self.int8_path

    def describe(self) -> dict[str, Any]:
        return dict(self.details)


def make_inc_quantizer(config: Config, trained: Any, dataset: Any, calibration_raw: np.ndarray,
                       workdir: Path) -> IncQuantizer:
    from edge_kit.compile.quantize.ort import build_host, resolve_target

    target, warning = resolve_target(config.quantize.target)
    if target == "arm64":
        raise ConfigError("quantize.target", "'arm64' is not supported by the inc backend (INC's pt2e path "
                          "targets x86)", hint="use quantize.backend = \"ort\" for arm64")
    import torch
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import INT8StaticQuantConfig, TuningConfig, autotune, convert, prepare

    from edge_kit.compile.evaluate import accuracy
    from edge_kit.train.models import load_trained_model

    torch.manual_seed(0)
    model = load_trained_model(config, Path(trained.checkpoint)).eval()
    calib = [torch.from_numpy(dataset.preprocess(calibration_raw[i : i + CALIBRATION_BATCH]))
             for i in range(0, len(calibration_raw), CALIBRATION_BATCH)]
    x_test = torch.from_numpy(dataset.preprocess(dataset.X_test))
    batch = torch.export.Dim("batch", min=1)
    example = (calib[0],)
    captured = export(model, example, dynamic_shapes=({0: batch},))
    if captured is None:
        raise UsageError("INC could not capture the model with torch.export; use quantize.backend = \"ort\"")

    def run_fn(m: Any) -> None:
        with torch.no_grad():
            for x in calib:
                m(x)

    def eval_fn(m: Any) -> float:
        with torch.no_grad():
            return accuracy(m(x_test).numpy(), dataset.y_test)

    granularity = "per_channel" if config.quantize.per_channel else "per_tensor"
    fp32 = eval_fn(model)
    # INC's tolerable loss is relative to the fp32 metric; the gate's budget is absolute (and relative).
    tolerable = config.gate.max_drop / fp32 if fp32 > 0 else 0.0
    if config.gate.max_relative_drop is not None:
        tolerable = min(tolerable, config.gate.max_relative_drop)
    space = [INT8StaticQuantConfig(w_granularity=granularity, act_sym=sym, act_algo=algo)
             for sym in (False, True) for algo in ("minmax", "kl")]
    tuning = TuningConfig(config_set=space, tolerable_loss=tolerable, max_trials=len(space))
    quantized = autotune(captured, tuning, eval_fn=eval_fn, run_fn=run_fn, example_inputs=example)
    note = "INC autotune met the budget"
    if quantized is None:
        # No trial met the budget: quantize with the default config anyway, so the gate measures and
        # reports the failure the same way as for the ort backend.
        note = "INC autotune found no config within the budget; the gate measured INC's default config"
        recaptured = export(model, example, dynamic_shapes=({0: batch},))
        prepared = prepare(recaptured, INT8StaticQuantConfig(w_granularity=granularity))
        run_fn(prepared)
        quantized = convert(prepared)
    # Captured from an eval-mode model, but GraphModules start with training=True; say what it is.
    for module in quantized.modules():
        module.training = False
    raw_path = workdir / "inc-int8-raw.onnx"
    torch.onnx.export(quantized, example, str(raw_path), input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    int8_path = workdir / "inc-int8.onnx"
    folded = fold_weight_quantization(onnx.load(str(raw_path)))
    onnx.save(folded, str(int8_path))
    details = {"backend": "inc", "format": "QDQ", "per_channel": config.quantize.per_channel,
               "target": target, "target_requested": config.quantize.target,
               "engine": "neural_compressor pt2e (X86InductorQuantizer)",
               "tolerable_loss_relative": tolerable, "activation_type": "QUInt8", "weight_type": "QInt8"}
    details["host"] = build_host()
    return IncQuantizer(Path(trained.onnx), int8_path, details, notes=[note] + ([warning] if warning else []))


def fold_weight_quantization(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace `float W -> QuantizeLinear [-> Clip] -> DequantizeLinear` by `int8 W -> DequantizeLinear`.

    The torch exporter keeps the fp32 weights and quantizes them at run time; storing them as the
    int8 values they quantize to gives the same numbers at a quarter of the size.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    remove: list[onnx.NodeProto] = []
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits or len(q.input) < 3:
            continue
        if q.input[1] not in inits or q.input[2] not in inits:
            continue
        chain = [q]
        out = q.output[0]
        nxt = readers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Clip":
            chain.append(nxt[0])
            out = nxt[0].output[0]
            nxt = readers.get(out, [])
        if len(nxt) != 1 or nxt[0].op_type != "DequantizeLinear":
            continue
        dq = nxt[0]
        w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float64)
        zp_t = inits[q.input[2]]
        zp = numpy_helper.to_array(zp_t)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale_b, zp_b = scale.reshape(shape), zp.astype(np.float64).reshape(shape)
        else:
            scale_b, zp_b = scale, zp.astype(np.float64)
        info = np.iinfo(zp.dtype)
        values = np.clip(np.rint(w / scale_b) + zp_b, info.min, info.max).astype(zp.dtype)
        name = f"{q.input[0]}_quantized"
        graph.initializer.append(numpy_helper.from_array(values, name))
        dq.input[0] = name
        remove.extend(chain)
    for node in remove:
        graph.node.remove(node)
    _quantize_biases(graph)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


def _quantize_biases(graph: onnx.GraphProto) -> None:
    """Give Conv/Gemm a DequantizeLinear'd int32 bias (scale = input scale x weight scale).

    The exported graph keeps biases in float, and ORT only fuses a QDQ Conv/Gemm into an int8
    kernel when the bias, too, arrives through DequantizeLinear; int32 at that scale is exact
    enough (it is what the int8 kernel accumulates in anyway).
    """
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    new_nodes: list[tuple[int, onnx.NodeProto]] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        act, weight = producer.get(node.input[0]), producer.get(node.input[1])
        if act is None or weight is None or act.op_type != "DequantizeLinear" or weight.op_type != "DequantizeLinear":
            continue
        if act.input[1] not in inits or weight.input[1] not in inits:
            continue
        act_scale = numpy_helper.to_array(inits[act.input[1]]).astype(np.float64)
        w_scale = numpy_helper.to_array(inits[weight.input[1]]).astype(np.float64).reshape(-1)
        if act_scale.size != 1:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        scale = (float(act_scale.reshape(-1)[0]) * w_scale).astype(np.float32)
        if scale.size == 1:
            scale = scale.reshape(())
        q = np.clip(np.rint(bias / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2]
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}_quantized"),
            numpy_helper.from_array(scale, f"{base}_quantized_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int32), f"{base}_quantized_zero_point"),
        ])
        dq = onnx.helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", f"{base}_quantized_scale", f"{base}_quantized_zero_point"],
            [f"{base}_dequantized"], name=f"{base}_DequantizeLinear",
        )
        if scale.ndim == 1:
            dq.attribute.append(onnx.helper.make_attribute("axis", 0))
        node.input[2] = dq.output[0]
        new_nodes.append((index, dq))
    for offset, (index, dq) in enumerate(new_nodes):
        graph.node.insert(index + offset, dq)
