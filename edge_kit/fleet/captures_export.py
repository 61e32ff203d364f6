"""`edge-kit fleet captures export`, the client side: page through `GET /api/captures` and write `.npz` shards.

What it writes into the output folder (docs/captures.md, "Export, snapshot, retrain"):

- `captures-00000.npz`, ...: arrays `X` (n, *input_shape) float32, `y` (n,) int64 (the class index into
  `labels`, -1 unlabelled), `labels` (class names), and per record `id`, `device`, `model_sha256`,
  `request_id` ("" when none), `label_source` (`device`, `csv`, or "" unlabelled);
- `manifest.json`: the server, the filters, counts per device and label source, the model versions the
  records came from, the class names and input spec, the shards.

`labels` is the class list of the bundles the records came from (the page's `models`); when bundles
disagree, or a label (from a CSV) is not among their classes, it is the sorted union of every name seen,
the same array in every shard. `--labels-csv` fills or overrides labels by request id (`request_id,label`:
every row of that request) or by request id and row (`request_id,row,label`, which wins over the former).
With a CSV, `--labelled-only` is applied after the CSV's labels, so the server is asked for every record.

The folder is written as `<out>.tmp` and renamed into place at the end: a failed export leaves the previous
export as it was, and a re-run replaces it whole.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np

from device_agent.atomic import atomic_write_bytes
from edge_kit.errors import EdgeKitError, UsageError

EXPORT_SCHEMA = "edgekit.captures_export/1"
MANIFEST = "manifest.json"
SHARD_NAME = "captures-{:05d}.npz"
PAGE_LIMIT = 1000
_STRINGS = ("id", "device", "model_sha256", "request_id", "label_source")
# Numbers per record, with the dtype of their array: where in its request the row was, when and in which
# window it was served, and what the model said (-1 / NaN when the server did not say).
_NUMBERS = {"row": np.int64, "predicted": np.int64, "created": np.float64, "window_start": np.float64}


class ExportProtocolError(EdgeKitError):
    """The fleet server answered something that is not an export page (exit 1, like a server failure)."""


# -- --since --------------------------------------------------------------------------------------------------

def parse_since(text: str | None) -> float | None:
    """Unix seconds, or an ISO 8601 date/time (UTC when it names no zone); UsageError (exit 2) otherwise."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise UsageError(f"--since {text!r} is neither unix seconds nor an ISO 8601 time",
                             hint="e.g. --since 1765000000 or --since 2026-12-01T00:00:00Z") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return when.timestamp()
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--since must be a time after 1970, got {text!r}")
    return value


# -- --labels-csv ---------------------------------------------------------------------------------------------

@dataclass
class CsvLabels:
    """Labels from a CSV: per (request id, row) and per request id; which keys matched a record."""

    path: str
    by_row: dict[tuple[str, int], str] = field(default_factory=dict)
    by_request: dict[str, str] = field(default_factory=dict)
    used: set[tuple[str, int | None]] = field(default_factory=set)

    def label_for(self, request_id: str | None, row: int) -> str | None:
        if request_id is None:
            return None
        if (request_id, row) in self.by_row:
            self.used.add((request_id, row))
            return self.by_row[(request_id, row)]
        if request_id in self.by_request:
            self.used.add((request_id, None))
            return self.by_request[request_id]
        return None

    def summary(self) -> dict[str, Any]:
        entries = len(self.by_row) + len(self.by_request)
        return {"file": self.path, "entries": entries, "matched": len(self.used), "unmatched": entries - len(self.used)}


def read_labels_csv(path: str | Path) -> CsvLabels:
    """Parse `request_id,label` / `request_id,row,label` lines (an optional header naming those columns).

    UsageError (exit 2) naming the line for a malformed line, a bad row number, an empty field, or a key
    given two different labels."""
    p = Path(path)
    out = CsvLabels(str(p))
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            lines = list(enumerate(csv.reader(f), start=1))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"--labels-csv {p}: cannot read it: {exc}") from exc
    width: int | None = None
    for number, cells in lines:
        cells = [c.strip() for c in cells]
        if not any(cells):
            continue
        if number == 1 and cells and cells[0].lower() == "request_id":
            header = [c.lower() for c in cells]
            if header not in (["request_id", "label"], ["request_id", "row", "label"]):
                raise UsageError(f"--labels-csv {p}: line 1: the header must be request_id,label or "
                                 f"request_id,row,label, got {','.join(cells)}")
            width = len(header)
            continue
        if len(cells) not in (2, 3) or (width is not None and len(cells) != width):
            want = f"{width}" if width else "2 (request_id,label) or 3 (request_id,row,label)"
            raise UsageError(f"--labels-csv {p}: line {number}: {len(cells)} fields, expected {want}")
        if not all(cells):
            raise UsageError(f"--labels-csv {p}: line {number}: an empty field")
        request_id, label = cells[0], cells[-1]
        if len(cells) == 3:
            try:
                row = int(cells[1])
            except ValueError:
                row = -1
            if row < 0:
                raise UsageError(f"--labels-csv {p}: line {number}: row {cells[1]!r} is not a whole number >= 0")
            before = out.by_row.setdefault((request_id, row), label)
        else:
            before = out.by_request.setdefault(request_id, label)
        if before != label:
            raise UsageError(f"--labels-csv {p}: line {number}: {request_id!r} was already labelled {before!r}")
    return out


# -- one record -----------------------------------------------------------------------------------------------

def decode_input(record: dict[str, Any]) -> np.ndarray:
    """A record's input row as float32 (shape as recorded); ExportProtocolError when malformed."""
    spec = record.get("input")
    try:
        assert isinstance(spec, dict)
        dtype = np.dtype(str(spec["dtype"])).newbyteorder("<")
        shape = tuple(int(d) for d in spec["shape"])
        data = base64.b64decode(str(spec["data"]), validate=True)
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise ExportProtocolError(f"record {record.get('id')!r}: malformed input: {exc}") from exc
    return array.astype(np.float32)


# -- shards ---------------------------------------------------------------------------------------------------

class ShardWriter:
    """Collects records into shards of `shard_records` rows under `folder`, then writes them with one `labels`.

    Rows go to a part file as each shard fills (the class list is known only at the end); `finish`
    turns each part into its `captures-NNNNN.npz` with `y` indexing the final `labels`."""

    def __init__(self, folder: Path, shard_records: int) -> None:
        if shard_records < 1:
            raise UsageError(f"--shard-records must be at least 1, got {shard_records}")
        self.folder = folder
        self.shard_records = shard_records
        self._rows: list[np.ndarray] = []
        self._strings: dict[str, list[str]] = {n: [] for n in _STRINGS}
        self._labels: list[str] = []  # "" unlabelled
        self._numbers: dict[str, list[float]] = {n: [] for n in _NUMBERS}
        self.parts: list[tuple[Path, dict[str, list[str]], list[str], dict[str, list[float]]]] = []
        self.shape: tuple[int, ...] | None = None

    def add(self, X: np.ndarray, label: str | None, strings: dict[str, str],
            numbers: dict[str, float | None] | None = None) -> None:
        if self.shape is None:
            self.shape = tuple(X.shape)
        elif tuple(X.shape) != self.shape:
            raise UsageError(f"record {strings['id']!r} has input shape {list(X.shape)}, earlier records "
                             f"{list(self.shape)}: export one model's devices at a time (--devices)")
        self._rows.append(X)
        self._labels.append(label or "")
        for n in _STRINGS:
            self._strings[n].append(strings.get(n) or "")
        for n, dtype in _NUMBERS.items():
            value = (numbers or {}).get(n)
            self._numbers[n].append((-1 if dtype is np.int64 else float("nan")) if value is None else value)
        if len(self._rows) >= self.shard_records:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        part = self.folder / f".part-{len(self.parts):05d}.npy"
        np.save(part, np.stack(self._rows).astype(np.float32), allow_pickle=False)
        self.parts.append((part, self._strings, self._labels, self._numbers))
        self._rows, self._strings, self._labels = [], {n: [] for n in _STRINGS}, []
        self._numbers = {n: [] for n in _NUMBERS}

    def finish(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Write every shard with `y` indexing `labels` (which must hold every label seen); their list."""
        self._flush()
        index = {name: i for i, name in enumerate(labels)}
        shards = []
        for i, (part, strings, row_labels, numbers) in enumerate(self.parts):
            name = SHARD_NAME.format(i)
            X = np.load(part, allow_pickle=False)
            arrays = {"X": X, "y": np.array([index[n] if n else -1 for n in row_labels], dtype=np.int64),
                      "labels": np.array(list(labels), dtype=np.str_),
                      **{n: np.array(v, dtype=np.str_) for n, v in strings.items()},
                      **{n: np.array(v, dtype=_NUMBERS[n]) for n, v in numbers.items()}}
            with (self.folder / name).open("wb") as f:
                np.savez(f, **arrays)
            part.unlink()
            shards.append({"file": name, "records": len(X)})
        return shards


def class_list(models: dict[str, Any], seen: set[str]) -> list[str]:
    """The bundles' class names when they agree and hold every label seen; else the sorted union."""
    lists = [list(m["labels"]) for m in models.values() if isinstance(m, dict) and isinstance(m.get("labels"), list)]
    if lists and all(x == lists[0] for x in lists) and seen <= set(lists[0]):
        return [str(n) for n in lists[0]]
    names = set(seen)
    for x in lists:
        names.update(str(n) for n in x)
    return sorted(names)


# -- the export -----------------------------------------------------------------------------------------------

def _replace_folder(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def export_captures(get: Callable[[str], Any], out: str | Path, *, server: str = "",
                    devices: Sequence[str] | None = None, since: float | None = None, labelled_only: bool = False,
                    labels_csv: str | Path | None = None, shard_records: int = 10_000,
                    page_limit: int = PAGE_LIMIT) -> dict[str, Any]:
    """Page through the server's captures with `get(path_and_query) -> JSON` and write the export to `out`.

    Returns the manifest (also written as `out/manifest.json`). Errors `get` raises pass through;
    a page that is not `{"records": [...], "next": ...}` is ExportProtocolError (exit 1); a bad CSV
    or --shard-records is UsageError (exit 2). `out` is replaced only when the export is complete.
    """
    out = Path(out)
    csv_labels = read_labels_csv(labels_csv) if labels_csv else None
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, shard_records)
        stats = _page_all(get, writer, devices=devices, since=since, labelled_only=labelled_only,
                          csv_labels=csv_labels, page_limit=page_limit)
        labels = class_list(stats.models, stats.seen_labels)
        shards = writer.finish(labels)
        manifest = {
            "schema": EXPORT_SCHEMA, "server": server,
            "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "filters": {"devices": list(devices) if devices else None, "since": since,
                        "labelled_only": labelled_only, "labels_csv": str(labels_csv) if labels_csv else None},
            "records": stats.records, "labelled": stats.labelled,
            "counts": {"devices": stats.per_device, "label_sources": stats.per_source},
            "model_versions": stats.model_versions(),
            "labels": labels, "input": {"dtype": "float32", "shape": list(writer.shape or ())},
            "missing": stats.missing, "skipped_unlabelled": stats.skipped_unlabelled,
            "labels_csv": csv_labels.summary() if csv_labels else None,
            "shards": shards,
        }
        atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class _Stats:
    records: int = 0
    labelled: int = 0
    missing: int = 0
    skipped_unlabelled: int = 0
    per_device: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    model_records: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen_labels: set[str] = field(default_factory=set)

    def count(self, device: str, source: str | None, sha: str, version: Any) -> None:
        self.records += 1
        d = self.per_device.setdefault(device, {"records": 0, "labelled": 0, "label_sources": {}})
        d["records"] += 1
        if source:
            self.labelled += 1
            d["labelled"] += 1
            d["label_sources"][source] = d["label_sources"].get(source, 0) + 1
            self.per_source[source] = self.per_source.get(source, 0) + 1
        m = self.model_records.setdefault(sha, {"version": version, "records": 0})
        m["records"] += 1

    def model_versions(self) -> dict[str, Any]:
        out = {}
        for sha, m in self.model_records.items():
            found = self.models.get(sha)
            info: dict[str, Any] = found if isinstance(found, dict) else {}
            out[sha] = {"name": info.get("name"), "version": m["version"] or info.get("version"),
                        "records": m["records"]}
        return out


def _page_all(get: Callable[[str], Any], writer: ShardWriter, *, devices: Sequence[str] | None,
              since: float | None, labelled_only: bool, csv_labels: CsvLabels | None, page_limit: int) -> _Stats:
    stats = _Stats()
    params: dict[str, str] = {"limit": str(page_limit)}
    if devices:
        params["devices"] = ",".join(devices)
    if since is not None:
        params["since"] = repr(float(since))
    if labelled_only and csv_labels is None:  # with a CSV, unlabelled records may get a label here
        params["labelled_only"] = "1"
    cursors: set[str] = set()
    while True:
        page = get("/api/captures?" + urlencode(params))
        if not isinstance(page, dict) or not isinstance(page.get("records"), list):
            raise ExportProtocolError("GET /api/captures: the answer is not {\"records\": [...], \"next\": ...}")
        models = page.get("models")
        if isinstance(models, dict):
            for sha, info in models.items():
                stats.models.setdefault(str(sha), info)
        stats.missing += len(page.get("missing") or [])
        for record in page["records"]:
            _take(record, writer, stats, labelled_only, csv_labels)
        cursor = page.get("next")
        if cursor is None:
            return stats
        if not isinstance(cursor, str) or cursor in cursors:
            raise ExportProtocolError(f"GET /api/captures: the server's cursor {cursor!r} does not advance")
        cursors.add(cursor)
        params["after"] = cursor


def _take(record: Any, writer: ShardWriter, stats: _Stats, labelled_only: bool, csv_labels: CsvLabels | None) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise ExportProtocolError("GET /api/captures: a record is not an object with an 'id'")
    label = record.get("label")
    source = record.get("label_source") or ("device" if label is not None else None)
    request_id = record.get("request_id")
    if csv_labels is not None:
        key = str(request_id) if request_id is not None else None
        from_csv = csv_labels.label_for(key, int(record.get("row") or 0))
        if from_csv is not None:
            label, source = from_csv, "csv"
    if label is None:
        source = None
        if labelled_only:
            stats.skipped_unlabelled += 1
            return
    else:
        stats.seen_labels.add(str(label))
    X = decode_input(record)
    strings = {"id": record["id"], "device": str(record.get("device") or ""),
               "model_sha256": str(record.get("model_sha256") or ""),
               "request_id": "" if request_id is None else str(request_id), "label_source": source or ""}
    numbers = {n: _number(record.get(n)) for n in _NUMBERS}
    writer.add(X, None if label is None else str(label), strings, numbers)
    stats.count(strings["device"], source, strings["model_sha256"], record.get("model_version"))


def _number(value: Any) -> float | None:
    """A record's numeric field, or None when absent or not a finite number (the server's word, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None
