"""`edge-kit data add`: the devices' labelled captures become a DVC-tracked field data file (docs/captures.md).

An export folder (`edge-kit fleet captures export`: `captures-NNNNN.npz` shards and `manifest.json`) is
checked against the project before anything is written: the rows' shape must be the data source's, every
label a class name the source knows, and at least one record labelled (unlabelled records are skipped and
counted). Its labelled records are merged into the field data file (`data.field`, by default `field.npz`
beside the source's snapshot): cumulative, records already there (by capture id) skipped, written with
deterministic bytes. Then, in this order:

- `dvc add` records the file (its `.dvc` file; DVC also lists the file in the folder's `.gitignore`);
- the config gets `[data] field = "<path>"` (a text edit that keeps the user's comments);
- a `train` stage of a `dvc.yaml` beside the config whose deps list the source's snapshot gets the field
  file as a dep too, so `dvc repro` retrains when field data is added;
- `field-manifest.json` beside the file gets an entry: when, from which export (server, filters), the
  export's counts per device and label source, model versions, rows added and skipped, the new md5;
- git commits the config, the `.dvc` file, the manifest, the `.gitignore` and `dvc.yaml` when the
  project is in a git work tree (unless `commit=False`).

Bad input is DataError (exit 2) and leaves the field file as it was; if recording it with DVC fails, the
previous file is put back.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.atomic import atomic_write_bytes
from edge_kit.config import Config, load_config
from edge_kit.errors import DataError
from edge_kit.train.data import (
    FIELD_ARRAYS,
    materialise_snapshot,
    read_field_file,
    read_snapshot,
    snapshot_path,
)
from edge_kit.train.snapshot import (
    dvc_file_for,
    file_md5,
    find_dvc_root,
    track_snapshot,
    verify_snapshot,
    write_npz_deterministic,
)

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "manifest.json"
SHARD_GLOB = "captures-*.npz"
FIELD_FILE = "field.npz"
FIELD_MANIFEST = "field-manifest.json"
FIELD_MANIFEST_SCHEMA = "edgekit.field_manifest/1"
# The per-record string arrays an export shard holds beside X, y and labels.
_RECORD_STRINGS = ("id", "device", "model_sha256", "request_id", "label_source")


@dataclass(frozen=True)
class Export:
    """An export folder's records, concatenated over its shards in order; `label` is "" where unlabelled."""

    folder: Path
    manifest: dict[str, Any]
    X: np.ndarray
    label: np.ndarray  # str, per record
    strings: dict[str, np.ndarray]  # _RECORD_STRINGS -> str array per record

    @property
    def records(self) -> int:
        return len(self.X)


def read_export(folder: Path) -> Export:
    """The records of a `fleet captures export` folder; DataError when it is not one or a shard is malformed."""
    manifest_path = folder / EXPORT_MANIFEST
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder", hint="give the --out folder of `edge-kit fleet captures export`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder} has no {EXPORT_MANIFEST}: not a `fleet captures export` folder") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path}: expected a JSON object")
    listed = manifest.get("shards")
    if isinstance(listed, list) and listed:
        shards = [folder / str(s["file"] if isinstance(s, dict) else s) for s in listed]
    else:
        shards = sorted(folder.glob(SHARD_GLOB))
    xs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    strings: dict[str, list[np.ndarray]] = {name: [] for name in _RECORD_STRINGS}
    for shard in shards:
        try:
            with np.load(shard, allow_pickle=False) as npz:
                missing = [n for n in ("X", "y", "labels", *_RECORD_STRINGS) if n not in npz]
                if missing:
                    raise DataError(f"{shard}: not a captures shard, it lacks {missing}")
                X, y, names = np.asarray(npz["X"]), np.asarray(npz["y"]), [str(n) for n in npz["labels"]]
                got = {n: np.asarray(npz[n]).astype(np.str_) for n in _RECORD_STRINGS}
        except DataError:
            raise
        except Exception as exc:  # a missing or corrupt zip fails in many types
            raise DataError(f"cannot read captures shard {shard}: {exc}") from exc
        if not np.issubdtype(X.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{shard}: X must be numeric and y integer class indices")
        if any(len(a) != len(X) for a in (y, *got.values())):
            raise DataError(f"{shard}: its arrays do not all have X's {len(X)} rows")
        if len(y) and (y.min() < -1 or y.max() >= len(names)):
            raise DataError(f"{shard}: y holds indices outside its {len(names)} labels (-1 is unlabelled)")
        if xs and X.shape[1:] != xs[0].shape[1:]:
            raise DataError(f"{shard}: rows of shape {list(X.shape[1:])}, earlier shards {list(xs[0].shape[1:])}")
        if not np.all(np.isfinite(X)):
            raise DataError(f"{shard}: X holds NaN or infinite values")
        table = np.array([*names, ""], dtype=np.str_)  # index -1 -> ""
        xs.append(X.astype(np.float32))
        labels.append(table[y])
        for n in _RECORD_STRINGS:
            strings[n].append(got[n])
    if not xs:
        raise DataError(f"{folder} holds no captures shards ({SHARD_GLOB})")
    return Export(folder, manifest, np.concatenate(xs), np.concatenate(labels).astype(np.str_),
                  {n: np.concatenate(v).astype(np.str_) for n, v in strings.items()})


def default_field_path(config: Config) -> Path:
    """`data.field`, else field.npz beside the source's snapshot when that lies in the project, else data/."""
    if config.data.field:
        return config.resolve(config.data.field)
    beside = snapshot_path(config).parent / FIELD_FILE
    try:
        beside.relative_to(config.root.resolve())
        return beside
    except ValueError:
        return config.resolve(Path("data") / FIELD_FILE)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _count(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values.astype(np.str_), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _empty_field(input_shape: tuple[int, ...], labels: list[str]) -> dict[str, np.ndarray]:
    arrays = {n: np.zeros(0, dtype=np.str_) for n in _RECORD_STRINGS}
    return {"X": np.zeros((0, *input_shape), np.float32), "y": np.zeros(0, np.int64),
            "labels": np.array(labels, dtype=np.str_), **arrays}


def _existing_field(path: Path, input_shape: tuple[int, ...], labels: list[str]) -> tuple[dict[str, np.ndarray],
                                                                                          str | None]:
    """The field file as it is (checked against its .dvc file) with y re-indexed to `labels`; its md5."""
    if not path.exists():
        return _empty_field(input_shape, labels), None
    if not dvc_file_for(path).exists():
        raise DataError(f"{path} exists but DVC has no record of it ({dvc_file_for(path).name})",
                        hint="move it away (it is not field data edge-kit recorded) and run `data add` again")
    snap = verify_snapshot(path)
    arrays = read_field_file(path)
    if tuple(arrays["X"].shape[1:]) != input_shape:
        raise DataError(f"{path}: rows of shape {list(arrays['X'].shape[1:])}, the data source's {list(input_shape)}")
    names = [str(n) for n in arrays["labels"]]
    unknown = sorted({names[i] for i in np.unique(arrays["y"])} - set(labels))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not classes of the data source")
    index = np.array([labels.index(n) if n in labels else -1 for n in names], dtype=np.int64)
    y = index[arrays["y"]] if len(arrays["y"]) else np.zeros(0, np.int64)
    out = {**arrays, "X": arrays["X"].astype(np.float32), "y": y, "labels": np.array(labels, dtype=np.str_)}
    return {k: out[k] for k in FIELD_ARRAYS}, snap.dvc_md5


# -- text edits that keep the user's comments -----------------------------------------------------------------

def set_toml_key(text: str, section: str, key: str, value: str) -> str:
    """`text` with `key = "value"` in `[section]`: replaced in place, else added after the section's last line."""
    literal = json.dumps(value)
    lines = text.splitlines(keepends=True)
    header = re.compile(rf"^\s*\[\s*{re.escape(section)}\s*\]\s*(#.*)?$")
    start = next((i for i, line in enumerate(lines) if header.match(line.rstrip("\r\n"))), None)
    if start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{sep}\n[{section}]\n{key} = {literal}\n"
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
    assign = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*)(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s#]+)(.*)$", re.S)
    for i in range(start + 1, end):
        m = assign.match(lines[i])
        if m:
            lines[i] = f"{m.group(1)}{literal}{m.group(3)}"
            return "".join(lines)
    last = start
    for i in range(start + 1, end):
        if lines[i].strip():
            last = i
    if not lines[last].endswith("\n"):
        lines[last] += "\n"
    lines.insert(last + 1, f"{key} = {literal}\n")
    return "".join(lines)


def _set_config_field(config_path: Path, rel: str) -> bool:
    """Write `[data] field = rel` into the config; False when it already says so."""
    text = config_path.read_text(encoding="utf-8")
    new = set_toml_key(text, "data", "field", rel)
    if new == text:
        return False
    try:
        assert tomllib.loads(new)["data"]["field"] == rel
    except (tomllib.TOMLDecodeError, KeyError, AssertionError) as exc:
        raise DataError(f"cannot set data.field in {config_path} by a text edit ({exc})",
                        hint=f'add `field = "{rel}"` under [data] yourself') from exc
    atomic_write_bytes(config_path, new.encode("utf-8"))
    return True


def add_train_dep(dvc_yaml: Path, base_rel: str, field_rel: str) -> bool:
    """Add `field_rel` to the deps of `dvc_yaml`'s `train` stage when they list `base_rel`; True if edited."""
    import yaml

    if not dvc_yaml.is_file():
        return False
    text = dvc_yaml.read_text(encoding="utf-8")
    try:
        stage = ((yaml.safe_load(text) or {}).get("stages") or {}).get("train")
    except (yaml.YAMLError, AttributeError) as exc:
        log.warning("not editing %s: %s", dvc_yaml, exc)
        return False
    deps = stage.get("deps") if isinstance(stage, dict) else None
    if not isinstance(deps, list) or base_rel not in deps or field_rel in deps:
        return False
    lines = text.splitlines(keepends=True)
    in_train = False
    train_indent = -1
    dep = re.compile(rf"^(\s*)-\s*([\"']?){re.escape(base_rel)}\2\s*(#.*)?$")
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if re.match(r"^\s*train\s*:\s*(#.*)?$", line):
            in_train, train_indent = True, indent
            continue
        if in_train and stripped and not stripped.startswith("#") and indent <= train_indent:
            in_train = False
        m = dep.match(line.rstrip("\r\n"))
        if in_train and m:
            lines.insert(i + 1, f"{m.group(1)}- {field_rel}\n")
            new = "".join(lines)
            try:
                after = (yaml.safe_load(new)["stages"]["train"]["deps"])
            except (yaml.YAMLError, KeyError, TypeError):
                after = None
            if not isinstance(after, list) or field_rel not in after:
                log.warning("not editing %s: the edit did not read back", dvc_yaml)
                return False
            atomic_write_bytes(dvc_yaml, new.encode("utf-8"))
            return True
    return False


# -- the manifest ---------------------------------------------------------------------------------------------

def manifest_path_for(field_path: Path) -> Path:
    return field_path.with_name(FIELD_MANIFEST)


def read_field_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"schema": FIELD_MANIFEST_SCHEMA, "entries": []}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise ValueError("expected an object with an 'entries' list")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the field data manifest {path}: {exc}",
                        hint="restore it from git") from exc
    return doc


def manifest_summary(field_path: Path, md5: str) -> dict[str, Any]:
    """What the field manifest says of the field file with this md5 (for provenance): its entry's totals, or
    `{"manifest": None}` when no entry names that md5."""
    path = manifest_path_for(field_path)
    try:
        entries = read_field_manifest(path)["entries"]
    except DataError as exc:
        log.warning("%s", exc)
        return {"manifest": None}
    at = next((i for i in range(len(entries) - 1, -1, -1) if isinstance(entries[i], dict)
               and entries[i].get("md5") == md5), None)
    if at is None:
        return {"manifest": None}
    entry = entries[at]
    models: dict[str, Any] = {}
    for e in entries[: at + 1]:
        for sha, info in (e.get("model_versions") or {}).items():
            models.setdefault(sha, info)
    return {"manifest": path.name, "entries": at + 1, "time": entry.get("time"),
            "labelled_rows": entry.get("rows"), "devices": entry.get("devices", {}),
            "label_sources": entry.get("label_sources", {}), "model_versions": models}


# -- git ------------------------------------------------------------------------------------------------------

def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _commit(root: Path, paths: list[Path], message: str) -> tuple[str | None, str | None]:
    """Commit `paths` (only those) in the work tree holding `root`: (commit, None) or (None, why not)."""
    try:
        top = _git(["rev-parse", "--show-toplevel"], root)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"git is not usable: {exc}"
    if top.returncode != 0:
        return None, "the project is not inside a git work tree"
    names = [str(p) for p in paths if p.exists()]
    added = _git(["add", "--", *names], root)
    if added.returncode != 0:
        return None, f"git add failed: {added.stderr.strip()}"
    if _git(["diff", "--cached", "--quiet", "--", *names], root).returncode == 0:
        return None, "nothing changed for git"
    done = _git(["commit", "-q", "-m", message, "--", *names], root)
    if done.returncode != 0:
        return None, f"git commit failed: {(done.stderr or done.stdout).strip()}"
    return _git(["rev-parse", "HEAD"], root).stdout.strip(), None


# -- data add -------------------------------------------------------------------------------------------------

def add_field_data(config_path: str | Path, export_dir: str | Path, *, commit: bool = True) -> dict[str, Any]:
    """Merge an export folder's labelled records into the project's field data and record it (module doc).

    Returns what was done: field path, md5 (and the previous one), rows in total / added / skipped as
    duplicates / skipped unlabelled, added rows per device and label source, whether the config and
    dvc.yaml were edited, and `committed` with the commit or the `reason` there is none.
    Raises DataError (exit 2) on bad input, leaving the field file as it was.
    """
    config_path = Path(config_path).resolve()
    config = load_config(config_path)
    export = read_export(Path(export_dir))
    base = materialise_snapshot(config)
    raw = read_snapshot(config, base.path)
    input_shape = tuple(int(d) for d in raw.X.shape[1:])
    if tuple(export.X.shape[1:]) != input_shape:
        raise DataError(f"{export.folder}: captured rows have shape {list(export.X.shape[1:])}, the project's "
                        f"input is {list(input_shape)} ({config.data.source})",
                        hint="export only the devices that run this project's model (--devices)")
    labelled = export.label != ""
    unknown = sorted(set(export.label[labelled].tolist()) - set(raw.labels))
    if unknown:
        raise DataError(f"{export.folder}: labels {unknown} are not classes of the project",
                        hint=f"classes: {', '.join(raw.labels)}")
    if not labelled.any():
        raise DataError(f"{export.folder}: none of its {export.records} records is labelled",
                        hint="label them (feed_labels on the device, or --labels-csv at export)")

    field_path = default_field_path(config)
    if find_dvc_root(field_path.parent) is None:
        raise DataError(f"{field_path} is not inside a DVC repository",
                        hint="run `dvc init` at the project's root, then add the data again")
    field_path.parent.mkdir(parents=True, exist_ok=True)
    current, previous_md5 = _existing_field(field_path, input_shape, raw.labels)
    seen = set(current["id"].tolist())
    take = np.zeros(export.records, dtype=bool)
    for i in np.flatnonzero(labelled):
        rid = str(export.strings["id"][i])
        if rid not in seen:
            seen.add(rid)
            take[i] = True
    skipped_unlabelled = int((~labelled).sum())
    skipped_duplicates = int(labelled.sum() - take.sum())
    rel = _rel(field_path, config.root)
    result: dict[str, Any] = {"field": rel, "dvc_file": _rel(dvc_file_for(field_path), config.root),
                              "export": str(export.folder), "added": int(take.sum()),
                              "skipped_duplicates": skipped_duplicates, "skipped_unlabelled": skipped_unlabelled,
                              "previous_md5": previous_md5}
    if not take.any():
        result |= {"md5": previous_md5, "rows": len(current["y"]), "devices": {}, "label_sources": {},
                   "config_updated": False, "dvc_yaml_updated": False, "manifest": None,
                   "committed": False, "commit": None, "reason": "no new records: every labelled one is there"}
        return result

    new_y = np.array([raw.labels.index(n) for n in export.label[take]], dtype=np.int64)
    merged = {"X": np.concatenate([current["X"], export.X[take]]), "y": np.concatenate([current["y"], new_y]),
              "labels": np.array(raw.labels, dtype=np.str_)}
    for n in _RECORD_STRINGS:
        merged[n] = np.concatenate([current[n].astype(np.str_), export.strings[n][take]]).astype(np.str_)

    backup = field_path.with_name(field_path.name + ".previous")
    if field_path.exists():
        backup.unlink(missing_ok=True)
        os.link(field_path, backup)  # the old bytes stay reachable until DVC has recorded the new ones
    try:
        write_npz_deterministic(field_path, merged)
        snap = track_snapshot(field_path)
    except BaseException:
        if backup.exists():
            os.replace(backup, field_path)
        else:
            field_path.unlink(missing_ok=True)
        raise
    backup.unlink(missing_ok=True)

    config_updated = _set_config_field(config_path, rel)
    dvc_yaml = config.root / "dvc.yaml"
    dvc_yaml_updated = add_train_dep(dvc_yaml, _rel(base.path, config.root), rel)

    added_devices = _count(export.strings["device"][take])
    added_sources = _count(export.strings["label_source"][take])
    manifest_file = manifest_path_for(field_path)
    doc = read_field_manifest(manifest_file)
    em = export.manifest
    entry = {
        "time": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "export": {"folder": str(export.folder), "server": em.get("server"), "filters": em.get("filters"),
                   "created": em.get("created"), "records": export.records},
        "export_counts": em.get("counts"),
        "model_versions": em.get("model_versions") or {},
        "added": int(take.sum()), "skipped_duplicates": skipped_duplicates,
        "skipped_unlabelled": skipped_unlabelled,
        "added_devices": added_devices, "added_label_sources": added_sources,
        "rows": len(merged["y"]), "devices": _count(merged["device"]),
        "label_sources": _count(merged["label_source"]),
        "md5": snap.dvc_md5, "previous_md5": previous_md5,
    }
    doc["schema"] = FIELD_MANIFEST_SCHEMA
    doc["entries"].append(entry)
    atomic_write_bytes(manifest_file, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    assert file_md5(field_path) == snap.dvc_md5

    result |= {"md5": snap.dvc_md5, "rows": len(merged["y"]), "devices": added_devices,
               "label_sources": added_sources, "config_updated": config_updated,
               "dvc_yaml_updated": dvc_yaml_updated, "manifest": _rel(manifest_file, config.root)}
    if not commit:
        return result | {"committed": False, "commit": None, "reason": "--no-commit"}
    paths = [config_path, dvc_file_for(field_path), manifest_file, field_path.parent / ".gitignore"]
    if dvc_yaml_updated:
        paths.append(dvc_yaml)
    per_device = ", ".join(f"{d} {n}" for d, n in added_devices.items())
    message = (f"Field data: {int(take.sum())} labelled captured rows added ({per_device}; "
               f"{skipped_duplicates} already there, {skipped_unlabelled} unlabelled skipped), "
               f"{len(merged['y'])} in all, md5 {snap.dvc_md5}")
    sha, reason = _commit(config.root, paths, message)
    return result | {"committed": sha is not None, "commit": sha, "reason": reason}
