"""The data leg of reproducibility: a snapshot file tracked by DVC, and its md5 check.

A snapshot is one file (an `.npz` materialised from a built-in dataset, or the user's own npz/csv).
It is `dvc add`-ed in the user's repository (local cache, no remote needed), so its `.dvc` file,
committed to git, records the md5 the run was trained on. Before every run the file's md5 is
compared with the `.dvc` file: a snapshot that changed behind DVC's back refuses to train.

Built-in datasets are written deterministically (fixed zip timestamps, fixed member order), so a
fresh clone that lacks the git-ignored data file rebuilds exactly the bytes the `.dvc` file names.

A snapshot may instead be the output of a stage of `dvc.yaml` (so `dvc repro` makes it on a fresh
clone): then DVC records its md5 in `dvc.lock`, that is the record it is checked against, and it is
never `dvc add`-ed (DVC allows one owner per output).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.atomic import atomic_write_bytes
from edge_kit.errors import DataError

log = logging.getLogger(__name__)

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SnapshotInfo:
    """Where the snapshot lives and the md5 DVC recorded for it (equal to the file's md5 when loaded)."""

    path: Path
    dvc_md5: str
    dvc_file: Path

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "dvc_md5": self.dvc_md5, "dvc_file": str(self.dvc_file)}


def file_md5(path: Path) -> str:
    """The md5 DVC 3 records for a single file: the plain md5 of its bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like `np.savez`, but byte-identical for identical arrays (np.savez stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    atomic_write_bytes(path, buffer.getvalue())


def dvc_file_for(path: Path) -> Path:
    return path.with_name(path.name + ".dvc")


def recorded_md5(dvc_file: Path) -> str:
    """The md5 of the single output a `.dvc` file describes."""
    import yaml  # a DVC dependency; imported here so the CLI stays quick to start

    try:
        doc = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
        outs = doc["outs"]
        if len(outs) != 1:
            raise ValueError(f"expected one output, found {len(outs)}")
        return str(outs[0]["md5"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"cannot read the DVC record {dvc_file}: {exc}",
                        hint="restore it from git, or delete it and let edge-kit `dvc add` the snapshot again") from exc


def find_dvc_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def verify_snapshot(path: Path) -> SnapshotInfo:
    """Check a snapshot against its `.dvc` file. DataError (exit 2) when it is missing or changed."""
    dvc_file = dvc_file_for(path)
    if not path.is_file():
        raise DataError(f"data snapshot {path} is missing",
                        hint=f"restore it with `dvc checkout {path.name}` or `dvc pull` in {path.parent}")
    expected = recorded_md5(dvc_file)
    actual = file_md5(path)
    if actual != expected:
        raise DataError(
            f"data snapshot {path} does not match its DVC record {dvc_file.name} "
            f"(md5 {actual}, recorded {expected}); refusing to train on unrecorded data",
            hint=f"restore it with `dvc checkout {dvc_file.name}`, or if the change is intended run "
                 f"`dvc add {path.name}` and commit {dvc_file.name}",
        )
    return SnapshotInfo(path=path, dvc_md5=actual, dvc_file=dvc_file)


@dataclass(frozen=True)
class StageRecord:
    """The `dvc.yaml` stage that outputs a snapshot, and the md5 `dvc.lock` holds (None before its first run)."""

    dvc_yaml: Path
    stage: str
    lock_file: Path
    md5: str | None


def _out_paths(outs: object) -> list[str]:
    """`outs:` entries are plain paths or one-key maps of a path to its options."""
    if not isinstance(outs, list):
        return []
    return [str(next(iter(o))) if isinstance(o, dict) and o else str(o) for o in outs]


def stage_record(path: Path, root: Path) -> StageRecord | None:
    """The `dvc.yaml` stage (in `path`'s folder or a parent up to the DVC root) that outputs `path`."""
    import yaml

    path = path.resolve()
    root = root.resolve()
    for folder in (path.parent, *path.parent.parents):
        dvc_yaml = folder / "dvc.yaml"
        if dvc_yaml.is_file():
            rel = path.relative_to(folder).as_posix()
            try:
                stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
            except (OSError, yaml.YAMLError, AttributeError) as exc:
                raise DataError(f"cannot read {dvc_yaml}: {exc}") from exc
            for name, stage in stages.items():
                if isinstance(stage, dict) and rel in _out_paths(stage.get("outs")):
                    lock_file = folder / "dvc.lock"
                    return StageRecord(dvc_yaml, str(name), lock_file, _locked_md5(lock_file, str(name), rel))
        if folder == root:
            return None
    return None


def _locked_md5(lock_file: Path, stage: str, rel: str) -> str | None:
    import yaml

    if not lock_file.is_file():
        return None
    try:
        outs = yaml.safe_load(lock_file.read_text(encoding="utf-8"))["stages"][stage]["outs"]
        return next((str(o["md5"]) for o in outs if o["path"] == rel), None)
    except KeyError:
        return None  # the stage has not run yet
    except (OSError, yaml.YAMLError, TypeError) as exc:
        raise DataError(f"cannot read the DVC record {lock_file}: {exc}",
                        hint="restore it from git, or delete it and let `dvc repro` record the pipeline again") from exc


def verify_stage_output(path: Path, record: StageRecord) -> SnapshotInfo:
    """Check a stage's snapshot against `dvc.lock`. DataError (exit 2) when missing or changed."""
    if not path.is_file():
        raise DataError(f"data snapshot {path} is missing",
                        hint=f"make it with `dvc repro {record.stage}` in {record.dvc_yaml.parent}")
    actual = file_md5(path)
    if record.md5 is not None and actual != record.md5:
        raise DataError(
            f"data snapshot {path} does not match its DVC record {record.lock_file.name} "
            f"(md5 {actual}, recorded {record.md5} by stage {record.stage!r}); refusing to train on unrecorded data",
            hint=f"restore it with `dvc checkout {record.stage}`, or if the change is intended run "
                 f"`dvc commit {record.stage}` and commit {record.lock_file.name}",
        )
    return SnapshotInfo(path=path, dvc_md5=actual, dvc_file=record.lock_file)


def track_snapshot(path: Path) -> SnapshotInfo:
    """`dvc add` a snapshot in the DVC repository that holds it (local cache only) and return its record.

    A snapshot that a `dvc.yaml` stage outputs is checked against `dvc.lock` instead (DVC records it
    when the stage finishes; before its first run there is nothing to check against)."""
    root = find_dvc_root(path.parent)
    if root is None:
        raise DataError(
            f"data snapshot {path} is not inside a DVC repository",
            hint="run `git init && dvc init` (or `dvc init --no-scm`) at your project's root, then train again",
        )
    record = stage_record(path, root)
    if record is not None:
        return verify_stage_output(path, record)
    from dvc.repo import Repo  # heavy import, only when a new snapshot is recorded

    log.info("recording data snapshot %s with DVC (repository %s)", path, root)
    try:
        # DVC's "To track the changes with git" hint goes to stdout, which belongs to --json output.
        with Repo(str(root)) as repo, contextlib.redirect_stdout(sys.stderr):
            repo.scm_context.quiet = True
            repo.add(str(path))
    except Exception as exc:  # DVC raises many unrelated types; the message is what the user needs
        raise DataError(f"`dvc add {path}` failed: {exc}") from exc
    return verify_snapshot(path)
