"""An upload body from a device, checked field by field: the body as a whole (400 when it cannot be a
batch at all), then each record against the input of the bundle it names (rejected one by one, with a
reason, while the rest of the batch stands). Nothing here trusts the body: sizes are compared with the
bundle's before anything is decoded or allocated, numbers must be finite, strings bounded.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.bundle.format import read_manifest
from device_agent.errors import EdgeKitError
from edge_kit.fleet.captures.shards import CaptureRecord
from edge_kit.fleet.reference_index import ReferenceStore

log = logging.getLogger(__name__)
UPLOAD_SCHEMA = "edgekit.captures/1"
LABELS_SCHEMA = "edgekit.capture_labels/1"
MAX_RECORDS = 1000
MAX_LABELS = 10_000
RECORD_ID = re.compile(r"[0-9a-f]{32}")
SHA256 = re.compile(r"[0-9a-f]{64}")
DTYPES = frozenset({"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64"})
MAX_TEXT = 128
MAX_TIME = 1e11  # unix seconds around the year 5000: beyond is not a time


class CaptureError(Exception):
    """A request the capture routes refuse as a whole, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What a model version takes and says, from its bundle: one row's dtype and shape, its class names."""

    sha256: str
    name: str
    version: str
    dtype: str
    shape: tuple[int, ...]
    labels: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize) * math.prod(self.shape)


class InputSpecs:
    """Input specs by model sha256, read from the bundles the fleet knows (`ReferenceStore`) once each."""

    def __init__(self, references: ReferenceStore) -> None:
        self.references = references
        self._known: dict[str, InputSpec | None] = {}
        self._lock = threading.Lock()

    def get(self, sha256: str) -> InputSpec | None:
        with self._lock:
            if sha256 in self._known:
                return self._known[sha256]
        ref = self.references.get(sha256)
        if ref is None:
            return None  # not cached: the bundle may appear in the folder later
        spec = _spec_from_bundle(ref.source, sha256, ref.name, ref.version, tuple(ref.labels))
        with self._lock:
            self._known[sha256] = spec
        return spec


def _spec_from_bundle(path: str, sha256: str, name: str, version: str, labels: tuple[str, ...]) -> InputSpec | None:
    """The input spec in the bundle's manifest: `model.inputs[0]` (dtype, shape after the batch dimension),
    the shape the agent serves (`monitoring.input_shape`) first."""
    try:
        manifest, _ = read_manifest(path)
    except EdgeKitError as exc:
        log.warning("captures: cannot read the manifest of %s: %s", path, exc)
        return None
    model = manifest.get("model") or {}
    inputs = model.get("inputs") if isinstance(model, dict) else None
    first = inputs[0] if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) else {}
    dtype = first.get("dtype", "float32")
    monitoring = manifest.get("monitoring") or {}
    shape: Any = monitoring.get("input_shape") if isinstance(monitoring, dict) else None
    if shape is None and isinstance(first.get("shape"), list):
        shape = first["shape"][1:]
    if (dtype not in DTYPES or not isinstance(shape, list) or not shape
            or not all(type(d) is int and d > 0 for d in shape)):
        log.warning("captures: bundle %s states no usable input dtype/shape (%r, %r)", path, dtype, shape)
        return None
    return InputSpec(sha256, name, version, str(dtype), tuple(shape), labels)


def _number(value: Any) -> float | None:
    """A finite JSON number as a float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _int(value: Any, lo: int, hi: int) -> int | None:
    return value if type(value) is int and lo <= value < hi else None


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()


def upload_records(body: Any, device: str) -> list[Any]:
    """The records list of an upload body; CaptureError 400 (not a batch) or 403 (another device's)."""
    return _device_list(body, device, "an upload body", UPLOAD_SCHEMA, "records", MAX_RECORDS, "upload")


def check_records(records: list[Any], specs: InputSpecs) -> tuple[list[tuple[CaptureRecord, InputSpec]],
                                                                  list[dict[str, Any]]]:
    """(records that passed with their model's spec, [{"id", "reason"}] of those refused)."""
    ids = Counter(r.get("id") for r in records if isinstance(r, dict) and isinstance(r.get("id"), str))
    good: list[tuple[CaptureRecord, InputSpec]] = []
    rejected: list[dict[str, Any]] = []
    for raw in records:
        rid = raw.get("id") if isinstance(raw, dict) else None
        shown = rid if isinstance(rid, str) and RECORD_ID.fullmatch(rid) else None
        if isinstance(rid, str) and ids[rid] > 1:
            rejected.append({"id": shown, "reason": "id repeated in the batch"})
            continue
        try:
            good.append(check_record(raw, specs))
        except ValueError as exc:
            rejected.append({"id": shown, "reason": str(exc)})
    return good, rejected


def check_record(raw: Any, specs: InputSpecs) -> tuple[CaptureRecord, InputSpec]:
    """One record against its bundle's spec; ValueError with the reason when it does not fit."""
    if not isinstance(raw, dict):
        raise ValueError("a record is a JSON object")
    rid = raw.get("id")
    if not isinstance(rid, str) or not RECORD_ID.fullmatch(rid):
        raise ValueError("'id' must be 32 lowercase hex digits")
    created, window_start = _number(raw.get("created")), _number(raw.get("window_start"))
    if created is None or not 0 <= created < MAX_TIME:
        raise ValueError("'created' must be a unix time")
    if window_start is None or not 0 <= window_start < MAX_TIME:
        raise ValueError("'window_start' must be a unix time")
    request_id = raw.get("request_id")
    if request_id is not None and not _text(request_id):
        raise ValueError(f"'request_id' must be null or 1 to {MAX_TEXT} printable characters")
    row = _int(raw.get("row"), 0, 2**31)
    if row is None:
        raise ValueError("'row' must be a non-negative integer")
    sha = raw.get("model_sha256")
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise ValueError("'model_sha256' must be 64 lowercase hex digits")
    spec = specs.get(sha)
    if spec is None:
        raise ValueError(f"unknown model {sha[:16]}...: no bundle the fleet knows holds it")
    data = _input(raw.get("input"), spec)
    output = raw.get("output")
    if not isinstance(output, list) or len(output) != len(spec.labels):
        raise ValueError(f"'output' must be a list of {len(spec.labels)} numbers (the bundle's classes)")
    values = [_number(v) for v in output]
    if any(v is None for v in values):
        raise ValueError("'output' must hold finite numbers")
    predicted = _int(raw.get("predicted"), 0, len(spec.labels))
    if predicted is None:
        raise ValueError(f"'predicted' must be a class index in [0, {len(spec.labels)})")
    label = raw.get("label")
    if label is not None and (not isinstance(label, str) or label not in spec.labels):
        raise ValueError("'label' must be null or one of the bundle's class names")
    record = CaptureRecord(id=rid, created=created, request_id=request_id, row=row, window_start=window_start,
                           model_sha256=sha, dtype=spec.dtype, shape=spec.shape, data=data,
                           output=[float(v) for v in values if v is not None], predicted=predicted, label=label)
    return record, spec


def _input(value: Any, spec: InputSpec) -> bytes:
    if not isinstance(value, dict):
        raise ValueError("'input' must be an object with 'dtype', 'shape' and 'data'")
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if dtype != spec.dtype:
        raise ValueError(f"input dtype must be the bundle's {spec.dtype!r}")
    # Compared as given, before any arithmetic on it: a hostile shape never sizes an allocation.
    if not isinstance(shape, list) or len(shape) != len(spec.shape) or any(
            type(d) is not int or d != e for d, e in zip(shape, spec.shape, strict=False)):
        raise ValueError(f"input shape must be the bundle's {list(spec.shape)} (one row, no batch dimension)")
    if not isinstance(data, str):
        raise ValueError("input 'data' must be a base64 string")
    n = spec.nbytes
    if len(data) != 4 * ((n + 2) // 3):
        raise ValueError(f"input data must be the base64 of {n} bytes (dtype size x shape)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("input 'data' is not valid base64") from exc
    if len(raw) != n:
        raise ValueError(f"input data must be the base64 of {n} bytes (dtype size x shape)")
    kind = np.dtype(spec.dtype)
    if kind.kind == "f" and not np.isfinite(np.frombuffer(raw, dtype=kind.newbyteorder("<"))).all():
        raise ValueError("input values must be finite (no NaN or infinity)")
    return raw


def label_updates(body: Any, device: str) -> list[Any]:
    """The label entries of a label-update body; CaptureError 400 / 403 as for uploads."""
    return _device_list(body, device, "a label update", LABELS_SCHEMA, "labels", MAX_LABELS, "update")


def _device_list(body: Any, device: str, what: str, schema: str, key: str, most: int, per: str) -> list[Any]:
    """`body[key]`, a list of at most `most` entries, from a device body of `schema` naming `device`."""
    if not isinstance(body, dict):
        raise CaptureError(400, f"{what} is a JSON object")
    if body.get("schema") != schema:
        raise CaptureError(400, f"'schema' must be {schema!r}")
    if not isinstance(body.get("device"), str):
        raise CaptureError(400, "'device' must be the uploading device's id")
    if body["device"] != device:
        raise CaptureError(403, f"this credential is device {device!r}'s, not {body['device'][:MAX_TEXT]!r}'s")
    entries = body.get(key)
    if not isinstance(entries, list):
        raise CaptureError(400, f"'{key}' must be a list")
    if len(entries) > most:
        raise CaptureError(400, f"at most {most} {key} per {per}, got {len(entries)}")
    return entries
