"""Field capture records as the fleet's export route gives them, and a stand-in for its paging, for the tests
of `fleet captures export` and `data add` that do not need a running fleet server."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

MODEL_SHA = hashlib.sha256(b"tiny model").hexdigest()
DIGIT_LABELS = [str(i) for i in range(10)]


def record_id(n: int) -> str:
    return hashlib.md5(f"record {n}".encode(), usedforsecurity=False).hexdigest()


def capture_record(n: int, x: np.ndarray, *, device: str = "dev-1", label: str | None = None,
                   request_id: str | None = None, row: int = 0, created: float | None = None,
                   model_sha256: str = MODEL_SHA) -> dict[str, Any]:
    """One record of `GET /api/captures` (docs/captures.md) holding input row `x`."""
    row_x = np.ascontiguousarray(x, dtype="<f4")
    return {"id": record_id(n), "device": device, "created": created if created is not None else 1_765_000_000.0 + n,
            "request_id": request_id, "row": row, "window_start": 1_765_000_000.0,
            "model_sha256": model_sha256, "model_version": "0.1.0",
            "input": {"dtype": "float32", "shape": list(row_x.shape),
                      "data": base64.b64encode(row_x.tobytes()).decode()},
            "output": [0.0] * 10, "predicted": 0, "label": label,
            "label_source": "device" if label is not None else None}


def digit_records(X: np.ndarray, y: np.ndarray, *, start: int = 0, labelled: int | None = None,
                  devices: Sequence[str] = ("dev-1", "dev-2")) -> list[dict[str, Any]]:
    """Records of rows X (with their true labels y; rows past `labelled` unlabelled), devices taking turns."""
    out = []
    for i in range(len(X)):
        label = str(int(y[i])) if labelled is None or i < labelled else None
        out.append(capture_record(start + i, X[i], device=devices[i % len(devices)], label=label,
                                  request_id=f"req-{(start + i) // 4}", row=(start + i) % 4))
    return out


def paging_server(records: list[dict[str, Any]], *, labels: Sequence[str] = DIGIT_LABELS,
                  calls: list[str] | None = None) -> Callable[[str], dict[str, Any]]:
    """A `get(path)` that pages `records` as the fleet's export route does (filters, cursor, limit)."""
    models = {MODEL_SHA: {"name": "tiny", "version": "0.1.0", "labels": list(labels),
                          "input": {"dtype": "float32", "shape": [1, 8, 8]}}}

    def get(path: str) -> dict[str, Any]:
        if calls is not None:
            calls.append(path)
        parts = urlsplit(path)
        assert parts.path == "/api/captures", path
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        chosen = records
        if q.get("devices"):
            chosen = [r for r in chosen if r["device"] in q["devices"].split(",")]
        if q.get("since"):
            chosen = [r for r in chosen if r["created"] >= float(q["since"])]
        if q.get("labelled_only") == "1":
            chosen = [r for r in chosen if r["label"] is not None]
        start = int(q.get("after", "0"))
        limit = int(q.get("limit", "1000"))
        page = chosen[start:start + limit]
        more = start + limit < len(chosen)
        return {"records": page, "next": str(start + limit) if more else None,
                "models": {MODEL_SHA: models[MODEL_SHA]} if page else {}, "missing": []}

    return get


def digits(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n digits rows (1, 8, 8) float32 and their int labels, from scikit-learn's offline copy."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = np.asarray(bunch.data[offset:offset + n], dtype=np.float32).reshape(-1, 1, 8, 8)
    return X, np.asarray(bunch.target[offset:offset + n], dtype=np.int64)


def write_export(out: Path, records: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    from edge_kit.fleet.captures_export import export_captures

    return export_captures(paging_server(records), out, server="http://fleet.test", **kwargs)
