"""One accepted upload batch as the bytes of its `.npz` shard, and back.

A shard holds the records as the device sent them, in their order (a record's `position`):

- `records`: UTF-8 JSON, one object per record: every field of docs/captures.md but the input's data
  (`id`, `created`, `request_id`, `row`, `window_start`, `model_sha256`, `dtype`, `shape`, `output`,
  `predicted`, `label` as uploaded);
- `data`: the inputs' bytes (C order, little endian) one after another; `offsets` (n + 1 int64): record
  i's bytes are data[offsets[i]:offsets[i + 1]].

A batch may hold rows of two model versions (a device switched bundles between uploads), so inputs of
different shapes share one flat buffer. Read with `np.load(..., allow_pickle=False)`: no objects.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

META_FIELDS = ("id", "created", "request_id", "row", "window_start", "model_sha256", "dtype", "shape", "output",
               "predicted", "label")


@dataclass(frozen=True)
class CaptureRecord:
    """A record that passed validation: its fields, and its input as bytes."""

    id: str
    created: float
    request_id: str | None
    row: int
    window_start: float
    model_sha256: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    output: list[float]
    predicted: int
    label: str | None

    def meta(self) -> dict[str, Any]:
        return {k: (list(self.shape) if k == "shape" else getattr(self, k)) for k in META_FIELDS}

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)


def encode(records: Sequence[CaptureRecord]) -> tuple[bytes, str]:
    """The shard's bytes and their sha256 (the shard's file name)."""
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r.data) for r in records])
    meta = json.dumps([r.meta() for r in records], allow_nan=False, separators=(",", ":")).encode()
    buf = io.BytesIO()
    np.savez(buf, records=np.frombuffer(meta, dtype=np.uint8), data=np.frombuffer(b"".join(r.data for r in records),
                                                                                 dtype=np.uint8), offsets=offsets)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def decode(shard: bytes) -> list[CaptureRecord]:
    """The records of a shard, in their positions."""
    with np.load(io.BytesIO(shard), allow_pickle=False) as z:
        meta = json.loads(z["records"].tobytes())
        data = z["data"].tobytes()
        offsets = z["offsets"]
    out = []
    for i, m in enumerate(meta):
        out.append(CaptureRecord(
            id=m["id"], created=m["created"], request_id=m["request_id"], row=m["row"],
            window_start=m["window_start"], model_sha256=m["model_sha256"], dtype=m["dtype"],
            shape=tuple(m["shape"]), data=data[int(offsets[i]):int(offsets[i + 1])], output=m["output"],
            predicted=m["predicted"], label=m["label"]))
    return out
