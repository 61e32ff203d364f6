"""Datasets: read a source into a DVC-tracked snapshot, split it (seeded, stored), fit preprocessing.

Sources (config `data.source`):
- `sklearn:<name>`: a dataset scikit-learn ships offline (digits, breast_cancer, wine, iris),
  materialised as `data/<name>.npz` next to the config;
- `npz:PATH`: arrays `X` (n, ...) and `y` (n,), optional `feature_names` / `labels`;
- `csv:PATH`: a header row, numeric feature columns and the `data.label_column`.

The split is stratified and seeded by `data.seed`; its row ids are stored in `.edgekit/split.json`
and logged with the run, so the test split is known and never used for training or calibration.
Preprocessing (mean/std standardisation) is fitted on the train split only.

Field data (`data.field`, written by `edge-kit data add` from the devices' captures, docs/captures.md) is a
second DVC-tracked file checked the same way. Its rows are split like the source's (stratified, seeded, stored
in `.edgekit/field-split.json` under the field file's md5, so a new field snapshot gets a new split) and
appended to both splits: the gate's test split holds field rows too. Their row ids follow the source's
(source rows 0..n-1, field rows n..).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.atomic import atomic_write_bytes
from edge_kit.config import Config
from edge_kit.errors import DataError
from edge_kit.train.snapshot import (
    SnapshotInfo,
    dvc_file_for,
    track_snapshot,
    verify_snapshot,
    write_npz_deterministic,
)

log = logging.getLogger(__name__)

IMAGE = "image"
FEATURES = "features"


FIELD_SPLIT_FILE = "field-split.json"
# The arrays of a field data file (`edge-kit data add`); `labels` holds the class names `y` indexes.
FIELD_ARRAYS = ("X", "y", "labels", "id", "device", "model_sha256", "request_id", "label_source")


@dataclass(frozen=True)
class FieldInfo:
    """The field data a dataset holds: its DVC record and how many of its rows went to each split."""

    snapshot: SnapshotInfo
    rows: int
    train_rows: int
    test_rows: int
    devices: dict[str, int]  # rows per device
    label_sources: dict[str, int]  # rows per label source (device, csv)

    def to_dict(self) -> dict[str, Any]:
        return {**self.snapshot.to_dict(), "rows": self.rows, "train_rows": self.train_rows,
                "test_rows": self.test_rows, "devices": dict(self.devices), "label_sources": dict(self.label_sources)}


@dataclass(frozen=True)
class Dataset:
    """Raw inputs (float32, shaped (n, *input_shape)) and int64 labels of both splits, plus how to preprocess."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    train_ids: np.ndarray  # row indices into the snapshot
    test_ids: np.ndarray
    input_kind: str  # "image" or "features"
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    feature_names: list[str]
    labels: list[str]  # class names, index = class id
    preprocessing: dict[str, Any]  # {"mean": float | list, "std": float | list}; input = (raw - mean) / std
    snapshot: SnapshotInfo
    split_sha256: str = field(default="")
    field: FieldInfo | None = None  # the field rows added to both splits (`data.field`), if any

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        """Model input for raw samples (with a batch dimension); the agent applies the same formula."""
        return apply_preprocessing(self.preprocessing, raw)


def apply_preprocessing(preprocessing: dict[str, Any], raw: np.ndarray) -> np.ndarray:
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return ((np.asarray(raw, dtype=np.float32) - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class RawData:
    X: np.ndarray  # float32, (n, *input_shape)
    y: np.ndarray  # int64, (n,)
    input_kind: str
    feature_names: list[str]
    labels: list[str]


# --- sources -----------------------------------------------------------------------------------

def _sklearn_raw(name: str) -> RawData:
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    bunch = loader()
    X = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    labels = [str(t) for t in bunch.target_names]
    if name == "digits":
        return RawData(X.reshape(len(X), 1, 8, 8), y, IMAGE, [], labels)
    return RawData(X, y, FEATURES, [str(f) for f in bunch.feature_names], labels)


def _raw_to_arrays(raw: RawData) -> dict[str, np.ndarray]:
    return {
        "X": raw.X,
        "y": raw.y,
        "input_kind": np.array(raw.input_kind),
        "feature_names": np.array(raw.feature_names, dtype=np.str_),
        "labels": np.array(raw.labels, dtype=np.str_),
    }


def _encode_labels(values: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Map label values (ints or strings) to class ids 0..k-1 in sorted order."""
    if values.ndim != 1:
        raise DataError(f"{where}: labels must be one-dimensional, got shape {values.shape}")
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{where}: labels must be integers or strings, found non-integer numbers")
        values = values.astype(np.int64)
    classes, y = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{where}: need at least 2 classes, found {len(classes)}")
    return y.astype(np.int64), [str(c) for c in classes]


def _npz_raw(path: Path) -> RawData:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz or "y" not in npz:
                raise DataError(f"{path}: an npz source needs arrays 'X' and 'y', found {sorted(npz.files)}")
            X = np.asarray(npz["X"])
            y_values = np.asarray(npz["y"])
            names = [str(n) for n in npz["feature_names"]] if "feature_names" in npz else []
            # Written as a 1-element array (np.ascontiguousarray makes 0-d arrays 1-d): its item, not its repr.
            stored_kind = str(npz["input_kind"].reshape(-1)[0]) if "input_kind" in npz else None
            stored_labels = [str(n) for n in npz["labels"]] if "labels" in npz else None
    except DataError:
        raise
    except Exception as exc:  # zip/format errors of a corrupt file come in many types
        raise DataError(f"cannot read npz data file {path}: {exc}") from exc
    if len(X) != len(y_values):
        raise DataError(f"{path}: X has {len(X)} rows but y has {len(y_values)}")
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{path}: X must be numeric, got dtype {X.dtype}")
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{path}: X holds NaN or infinite values")
    if stored_labels is not None and np.issubdtype(y_values.dtype, np.integer):
        # A snapshot written by edge-kit: ids already encoded, label names stored beside them.
        y, labels = y_values.astype(np.int64), stored_labels
    else:
        y, labels = _encode_labels(y_values, str(path))
    if X.ndim == 2:
        kind = stored_kind or FEATURES
        names = names or [f"f{i}" for i in range(X.shape[1])]
    elif X.ndim == 3:  # (n, H, W): a single-channel image
        kind, X = IMAGE, X[:, None, :, :]
    elif X.ndim == 4:
        kind = IMAGE
    else:
        raise DataError(f"{path}: X must be (n, features), (n, H, W) or (n, C, H, W), got shape {X.shape}")
    return RawData(X, y, kind, names if kind == FEATURES else [], labels)


def _csv_raw(path: Path, label_column: str) -> RawData:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read csv data file {path}: {exc}") from exc
    if len(rows) < 2:
        raise DataError(f"{path}: a csv source needs a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise DataError(f"{path}: label column {label_column!r} (config key 'data.label_column') not in header",
                        hint=f"columns: {', '.join(header)}")
    label_at = header.index(label_column)
    feature_cols = [i for i in range(len(header)) if i != label_at]
    X = np.empty((len(body), len(feature_cols)), dtype=np.float32)
    labels_raw: list[str] = []
    for r, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {r} has {len(row)} fields, the header has {len(header)}")
        labels_raw.append(row[label_at])
        for j, c in enumerate(feature_cols):
            try:
                X[r - 2, j] = float(row[c])
            except ValueError:
                raise DataError(f"{path}: line {r}, column {header[c]!r}: {row[c]!r} is not a number") from None
    if not np.all(np.isfinite(X)):
        raise DataError(f"{path}: features hold NaN or infinite values")
    y, labels = _encode_labels(np.array(labels_raw), str(path))
    return RawData(X, y, FEATURES, [header[c] for c in feature_cols], labels)


# --- snapshot ----------------------------------------------------------------------------------

def snapshot_path(config: Config) -> Path:
    """The file DVC tracks: the materialised built-in dataset, or the user's own data file."""
    kind, _, rest = config.data.source.partition(":")
    if kind == "sklearn":
        return config.resolve(f"data/{rest}.npz")
    return config.resolve(rest)


def materialise_snapshot(config: Config) -> SnapshotInfo:
    """Make sure the snapshot exists and matches its DVC record; record it with `dvc add` the first time."""
    kind, _, rest = config.data.source.partition(":")
    path = snapshot_path(config)
    dvc_file = dvc_file_for(path)
    if kind == "sklearn" and not path.exists():
        # Deterministic bytes: a fresh clone rebuilds exactly what the committed .dvc file names.
        log.info("materialising %s into %s", config.data.source, path)
        write_npz_deterministic(path, _raw_to_arrays(_sklearn_raw(rest)))
    if dvc_file.exists():
        return verify_snapshot(path)
    if not path.is_file():
        raise DataError(f"data file {path} is missing (config key 'data.source')")
    return track_snapshot(path)


def read_snapshot(config: Config, path: Path) -> RawData:
    kind = config.data.source.partition(":")[0]
    if kind == "csv":
        assert config.data.label_column is not None  # enforced by config validation
        return _csv_raw(path, config.data.label_column)
    return _npz_raw(path)


# --- split and preprocessing ---------------------------------------------------------------------

def split_ids(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of row ids; both sorted so the stored split reads naturally."""
    from sklearn.model_selection import train_test_split

    ids = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    try:
        train, test = train_test_split(ids, test_size=test_fraction, random_state=seed, stratify=stratify)
    except ValueError as exc:
        raise DataError(f"cannot split {len(y)} rows with test_fraction={test_fraction}: {exc}") from exc
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def _stored_split(config: Config, snapshot: SnapshotInfo, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The split recorded for this snapshot and seed, computed and stored the first time."""
    key = {"dvc_md5": snapshot.dvc_md5, "seed": config.data.seed, "test_fraction": config.data.test_fraction}
    return _recorded_split(config.ensure_workdir() / "split.json", key,
                           lambda: split_ids(y, config.data.test_fraction, config.data.seed))


def _recorded_split(split_file: Path, key: dict[str, Any],
                    compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, test ids) stored in `split_file` under `key`; computed and stored when absent or another key's."""
    if split_file.exists():
        try:
            stored = json.loads(split_file.read_text())
            if all(stored.get(k) == v for k, v in key.items()):
                return np.asarray(stored["train_ids"], np.int64), np.asarray(stored["test_ids"], np.int64)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable split record %s; recomputing it", split_file)
    train, test = compute()
    doc = {**key, "train_ids": train.tolist(), "test_ids": test.tolist()}
    atomic_write_bytes(split_file, json.dumps(doc).encode())
    return train, test


def read_field_file(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a field data file (FIELD_ARRAYS), checked for consistency; DataError when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in FIELD_ARRAYS if name not in npz]
            if missing:
                raise DataError(f"{path}: not a field data file (`edge-kit data add`): it lacks {missing}")
            arrays = {name: np.asarray(npz[name]) for name in FIELD_ARRAYS}
    except DataError:
        raise
    except Exception as exc:  # zip/format errors of a corrupt file come in many types
        raise DataError(f"cannot read field data file {path}: {exc}") from exc
    n = len(arrays["X"])
    wrong = [name for name in FIELD_ARRAYS if name != "labels" and len(arrays[name]) != n]
    if wrong:
        raise DataError(f"{path}: arrays {wrong} do not have X's {n} rows")
    y = arrays["y"]
    if not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() >= len(arrays["labels"]))):
        raise DataError(f"{path}: y must hold class indices into its labels array")
    return arrays


def _field_rows(path: Path, labels: list[str], input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A field file's arrays with X float32 and y re-indexed to the source's class names."""
    arrays = read_field_file(path)
    X = arrays["X"]
    if tuple(X.shape[1:]) != input_shape:
        raise DataError(f"{path}: field rows have shape {list(X.shape[1:])}, the data source's rows "
                        f"{list(input_shape)}")
    if not np.issubdtype(X.dtype, np.number) or not np.all(np.isfinite(X)):
        raise DataError(f"{path}: X must hold finite numbers")
    names = [str(n) for n in arrays["labels"]]
    unknown = sorted(set(names) - set(labels))
    used = {names[i] for i in np.unique(arrays["y"])} if len(X) else set()
    if unknown and used & set(unknown):
        raise DataError(f"{path}: field labels {sorted(used & set(unknown))} are not classes of the data source",
                        hint=f"classes: {', '.join(labels)}")
    index = np.array([labels.index(n) if n in labels else -1 for n in names], dtype=np.int64)
    return {**arrays, "X": X.astype(np.float32), "y": index[arrays["y"]] if len(X) else arrays["y"].astype(np.int64)}


def _field_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `split_ids`, but a field file too small to stratify (or to split at all) still trains."""
    from sklearn.model_selection import train_test_split

    ids = np.arange(len(y))
    if len(y) < 2:
        return ids.astype(np.int64), np.zeros(0, np.int64)
    try:
        return split_ids(y, test_fraction, seed)
    except DataError:  # fewer test rows than classes: split without stratifying
        train, test = train_test_split(ids, test_size=test_fraction, random_state=seed)
        return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def _stored_field_split(config: Config, field_md5: str, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The field rows' split, stored under the field file's md5 (a new field snapshot, a new split)."""
    key = {"field_md5": field_md5, "seed": config.data.seed, "test_fraction": config.data.test_fraction}
    return _recorded_split(config.ensure_workdir() / FIELD_SPLIT_FILE, key,
                           lambda: _field_split(y, config.data.test_fraction, config.data.seed))


def _counts(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values.astype(np.str_), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def fit_preprocessing(X_train: np.ndarray, input_kind: str) -> dict[str, Any]:
    """Standardisation fitted on the train split: one scalar for images, one value per feature for tables."""
    x = X_train.astype(np.float64)
    if input_kind == IMAGE:
        std = float(x.std())
        return {"mean": float(x.mean()), "std": std if std > 0 else 1.0}
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0  # a constant feature stays 0 instead of becoming NaN
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def load_dataset(config: Config) -> Dataset:
    """Materialise or verify the DVC snapshot, read it, split it and fit preprocessing.

    Raises DataError (exit 2) when the snapshot is missing, unreadable or no longer matches its `.dvc` file.
    """
    snapshot = materialise_snapshot(config)
    raw = read_snapshot(config, snapshot.path)
    train_ids, test_ids = _stored_split(config, snapshot, raw.y)
    import hashlib

    input_shape = tuple(int(d) for d in raw.X.shape[1:])
    X_train, y_train = raw.X[train_ids], raw.y[train_ids]
    X_test, y_test = raw.X[test_ids], raw.y[test_ids]
    split_sha = hashlib.sha256(train_ids.tobytes() + b"|" + test_ids.tobytes()).hexdigest()
    field_info = None
    if config.data.field:
        field_snapshot = verify_snapshot(config.resolve(config.data.field))
        rows = _field_rows(field_snapshot.path, raw.labels, input_shape)
        f_train, f_test = _stored_field_split(config, field_snapshot.dvc_md5, rows["y"])
        X_train = np.concatenate([X_train, rows["X"][f_train]])
        y_train = np.concatenate([y_train, rows["y"][f_train]])
        X_test = np.concatenate([X_test, rows["X"][f_test]])
        y_test = np.concatenate([y_test, rows["y"][f_test]])
        offset = len(raw.y)
        train_ids = np.concatenate([train_ids, f_train + offset])
        test_ids = np.concatenate([test_ids, f_test + offset])
        # The field md5 is part of the split's identity: the training fingerprint changes with the field data.
        split_sha = hashlib.sha256(train_ids.tobytes() + b"|" + test_ids.tobytes() + b"|"
                                   + field_snapshot.dvc_md5.encode()).hexdigest()
        field_info = FieldInfo(field_snapshot, len(rows["y"]), len(f_train), len(f_test),
                               _counts(rows["device"]), _counts(rows["label_source"]))
    return Dataset(
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        train_ids=train_ids,
        test_ids=test_ids,
        input_kind=raw.input_kind,
        input_shape=input_shape,
        feature_names=raw.feature_names,
        labels=raw.labels,
        preprocessing=fit_preprocessing(X_train, raw.input_kind),
        snapshot=snapshot,
        split_sha256=split_sha,
        field=field_info,
    )
