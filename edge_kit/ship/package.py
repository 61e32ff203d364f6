"""Assemble a device bundle's members and manifest (docs/architecture.md section 5) and write it via write_bundle."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.format import MODEL, REFERENCE, REPORT, SELFTEST, canonical_json, write_bundle
from device_agent.monitoring.channels import MonitorPlan
from device_agent.monitoring.reference import Reference, build_reference

SELFTEST_SAMPLES = 8
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


def monitor_plan(input_kind: str, input_shape: tuple[int, ...], feature_names: list[str],
                 labels: list[str]) -> MonitorPlan:
    if input_kind == "image":
        return MonitorPlan.for_image(tuple(input_shape), labels)
    return MonitorPlan.for_features(feature_names, labels)


def io_spec(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs as name, shape (symbolic dims as their names, e.g. "batch") and dtype."""

    def spec(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                     for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type))})
        return out

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def reference_json(plan: MonitorPlan, x_train_raw: np.ndarray, int8_train_logits: np.ndarray,
                   x_heldout_raw: np.ndarray, int8_heldout_logits: np.ndarray, bins: int) -> dict[str, Any]:
    """Reference histograms: input channels over the training split, output channels over the held-out split.

    On its own training data a model is more confident than on anything it has not seen (KS about 0.06
    on digits), so training-split outputs would make every healthy device look drifted on
    `out.confidence`. Field data is unseen data: the held-out split is the honest reference for outputs.
    """
    train = build_reference(plan, plan.values(x_train_raw, int8_train_logits), bins)
    heldout = build_reference(plan, plan.values(x_heldout_raw, int8_heldout_logits), bins)
    channels = {name: (heldout if name.startswith("out.") else train).channels[name] for name in plan.channel_names}
    doc = Reference(channels).to_json()
    doc["sources"] = {"in.*": "train split", "out.*": "held-out split"}
    return doc


def selftest_npz(x_test_raw: np.ndarray, int8_test_logits: np.ndarray, samples: int = SELFTEST_SAMPLES) -> bytes:
    """The test inputs the model is most sure about (largest top-1 margin), with the int8 outputs.

    Confident samples keep the agent's class check meaningful on other CPUs: a borderline sample
    could flip class from rounding differences alone.
    """
    top2 = np.sort(int8_test_logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    pick = np.sort(np.argsort(-margin, kind="stable")[:samples])
    buf = io.BytesIO()
    np.savez(buf, inputs=np.asarray(x_test_raw[pick], dtype=np.float32),
             outputs=np.asarray(int8_test_logits[pick], dtype=np.float32))
    return buf.getvalue()


def assemble_and_write(
    out_dir: Path,
    *,
    name: str,
    version: str,
    model_bytes: bytes,
    model_meta: dict[str, Any],
    labels: list[str],
    provenance: dict[str, Any],
    quantization: dict[str, Any],
    gate: dict[str, Any],
    plan: MonitorPlan,
    reference: dict[str, Any],
    report_md: str,
    selftest: bytes,
    signing_key: Ed25519PrivateKey | None,
    extra: dict[str, Any] | None = None,
    precision: str = "int8",
) -> Path:
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {**model_meta, "precision": precision, "output_kind": "logits", "labels": labels},
        "labels": labels,
        "provenance": provenance,
        "quantization": quantization,
        "gate": gate,
        "monitoring": plan.to_manifest(),
        "signed": signing_key is not None,
    }
    if extra:
        manifest.update(extra)
    members = {
        MODEL: model_bytes,
        REFERENCE: canonical_json(reference),
        REPORT: report_md.encode("utf-8"),
        SELFTEST: selftest,
    }
    # JSON-clean the manifest (numpy scalars, Paths) before write_bundle hashes and signs it.
    manifest = json.loads(json.dumps(manifest, default=_jsonable))
    return write_bundle(out_dir, manifest, members, signing_key=signing_key)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
