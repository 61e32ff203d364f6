"""What the capture routes do: an upload from validation through its shard to the index, label updates, the
counts and the paged export.

An upload's new records become one shard, written whole to the store before their index rows commit,
so the index never names a missing file; a store that is full (`CaptureStoreFull`, 507) stores nothing
of the batch, and rows whose shard could not be indexed leave no file behind. Records already indexed
(a replay after a lost answer) are counted as duplicates and written nowhere.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from edge_kit.fleet.captures import shards
from edge_kit.fleet.captures.index import CaptureIndex, Cursor
from edge_kit.fleet.captures.shards import CaptureRecord
from edge_kit.fleet.captures.store import CaptureStore
from edge_kit.fleet.captures.validation import (
    RECORD_ID,
    CaptureError,
    InputSpec,
    InputSpecs,
    check_records,
    label_updates,
    upload_records,
)
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.storage import Storage

EXPORT_LIMIT = 1000  # records per export page by default
MAX_EXPORT_LIMIT = 10_000
EXPORT_PAGE_BYTES = 16 * 1024 * 1024  # input bytes per page: a page ends early past this (at least one record)
_SAFE_DIR = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def device_dir(device: str) -> str:
    """The store folder of a device's shards: its id when that is a safe file name, else a hash of it."""
    return device if _SAFE_DIR.fullmatch(device) else "d-" + hashlib.sha256(device.encode()).hexdigest()[:32]


class Captures:
    """The fleet's capture store and index, as the HTTP routes use them."""

    def __init__(self, storage: Storage, references: ReferenceStore, store: CaptureStore) -> None:
        self.index = CaptureIndex(storage)
        self.store = store
        self.references = references
        self.specs = InputSpecs(references)
        self._lock = threading.Lock()  # one upload at a time: a replay racing its original finds it indexed

    def upload(self, device: str, body: Any) -> dict[str, Any]:
        """POST /api/captures/upload from `device` (authenticated): {"stored", "duplicates", "rejected"}."""
        records = upload_records(body, device)
        good, rejected = check_records(records, self.specs)
        with self._lock:
            already = self.index.existing([rec.id for rec, _ in good])
            new = [(rec, spec) for rec, spec in good if rec.id not in already]
            stored = self._store(device, new) if new else 0
        return {"stored": stored, "duplicates": len(good) - stored, "rejected": rejected}

    def _store(self, device: str, new: Sequence[tuple[CaptureRecord, InputSpec]]) -> int:
        data, sha = shards.encode([rec for rec, _ in new])
        now = time.time()
        name = f"{device_dir(device)}/{time.strftime('%Y-%m-%d', time.gmtime(now))}/{sha}.npz"
        self.store.put(name, data)  # CaptureStoreFull: nothing stored, nothing indexed
        rows = [{"id": rec.id, "device": device, "model_sha256": rec.model_sha256, "model_version": spec.version,
                 "window_start": rec.window_start, "created": rec.created, "request_id": rec.request_id,
                 "row_index": rec.row, "predicted": rec.predicted, "label": rec.label,
                 "label_source": "device" if rec.label is not None else None, "shard": name, "position": i,
                 "bytes": len(rec.data), "stored_at": now} for i, (rec, spec) in enumerate(new)]
        try:
            return self.index.insert(rows)
        except BaseException:
            self.store.discard(name)  # its rows did not commit: nothing names it
            raise

    def set_labels(self, device: str, body: Any) -> dict[str, Any]:
        """POST /api/captures/labels from `device`: {"updated", "unknown", "rejected"}."""
        entries = label_updates(body, device)
        rejected: list[dict[str, Any]] = []
        wanted: dict[str, str] = {}
        for e in entries:
            rid = e.get("id") if isinstance(e, dict) else None
            label = e.get("label") if isinstance(e, dict) else None
            if not isinstance(rid, str) or not RECORD_ID.fullmatch(rid) or not isinstance(label, str):
                rejected.append({"id": rid if isinstance(rid, str) and RECORD_ID.fullmatch(rid) else None,
                                 "reason": "a label update is {\"id\": <32 hex digits>, \"label\": <class name>}"})
                continue
            wanted[rid] = label
        models = self.index.models_of(device, list(wanted))
        updates = []
        for rid, label in wanted.items():
            if rid not in models:
                continue
            spec = self.specs.get(models[rid])
            if spec is not None and label not in spec.labels:
                rejected.append({"id": rid, "reason": "'label' must be one of the bundle's class names"})
                continue
            updates.append((rid, label))
        updated = self.index.set_labels(device, updates)
        return {"updated": updated, "unknown": len(wanted) - len(models), "rejected": rejected}

    def counts(self) -> dict[str, Any]:
        """GET /api/captures/counts: held, labelled and bytes per device and model version, and the store."""
        rows = self.index.counts()
        for row in rows:
            ref = self.references.get(row["model_sha256"])
            row["model_name"] = ref.name if ref is not None else None
        total = {"held": sum(r["held"] for r in rows), "labelled": sum(r["labelled"] for r in rows),
                 "bytes": sum(r["bytes"] for r in rows)}
        return {"counts": rows, "total": total, "store": self.store.describe()}

    def export(self, params: dict[str, str]) -> dict[str, Any]:
        """GET /api/captures: one page of records with their inputs, in stored order, and `next`."""
        unknown = sorted(set(params) - {"devices", "since", "labelled_only", "after", "limit"})
        if unknown:
            raise CaptureError(400, f"unknown parameter(s) {unknown}")
        devices = [d for d in params.get("devices", "").split(",") if d] or None
        try:
            since = float(params["since"]) if params.get("since") else None
            limit = int(params.get("limit") or EXPORT_LIMIT)
            after = Cursor.decode(params["after"]) if params.get("after") else None
        except ValueError as exc:
            raise CaptureError(400, f"bad export parameter: {exc}") from exc
        if since is not None and since != since:
            raise CaptureError(400, "'since' must be a unix time")
        if not 1 <= limit <= MAX_EXPORT_LIMIT:
            raise CaptureError(400, f"'limit' must be from 1 to {MAX_EXPORT_LIMIT}")
        labelled_only = params.get("labelled_only", "") in ("1", "true", "yes")
        rows = self.index.page(devices=devices, since=since, labelled_only=labelled_only, after=after,
                               limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        records: list[dict[str, Any]] = []
        models: dict[str, Any] = {}
        missing: list[str] = []
        size, last = 0, None
        decoded: dict[str, list[CaptureRecord] | None] = {}
        for row in rows:
            if records and size + int(row["bytes"]) > EXPORT_PAGE_BYTES:
                more = True
                break
            last = row
            rec = self._record(row, decoded)
            if rec is None:
                missing.append(row["id"])
                continue
            size += int(row["bytes"])
            records.append(rec)
            sha = row["model_sha256"]
            if sha not in models:
                spec = self.specs.get(sha)
                models[sha] = None if spec is None else {
                    "name": spec.name, "version": spec.version, "labels": list(spec.labels),
                    "input": {"dtype": spec.dtype, "shape": list(spec.shape)}}
        cursor = Cursor(float(last["stored_at"]), str(last["id"])).encode() if last is not None and more else None
        return {"records": records, "next": cursor, "models": models, "missing": missing}

    def _record(self, row: dict[str, Any], decoded: dict[str, list[CaptureRecord] | None]
                ) -> dict[str, Any] | None:
        """An export record from its index row and its shard (`decoded`: the shards this page read)."""
        name = str(row["shard"])
        if name not in decoded:
            try:
                decoded[name] = shards.decode(self.store.get(name))
            except (OSError, KeyError, ValueError, EOFError):
                decoded[name] = None
        found = decoded[name]
        position = int(row["position"])
        if found is None or not 0 <= position < len(found) or found[position].id != row["id"]:
            return None
        stored = found[position]
        return {"id": row["id"], "device": row["device"], "created": row["created"],
                "request_id": row["request_id"], "row": int(row["row_index"]), "window_start": row["window_start"],
                "model_sha256": row["model_sha256"], "model_version": row["model_version"],
                "input": {"dtype": stored.dtype, "shape": list(stored.shape),
                          "data": base64.b64encode(stored.data).decode()},
                "output": stored.output, "predicted": int(row["predicted"]), "label": row["label"],
                "label_source": row["label_source"], "stored_at": row["stored_at"]}
