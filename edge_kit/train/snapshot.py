"""The data leg of reproducibility: a snapshot file tracked by DVC, and its md5 check.

A snapshot is one file (an `.npz` materialised from a built-in dataset, or the user's own npz/csv).
It is `dvc add`-ed in the user's repository (local cache, no remote needed), so its `.dvc` file,
committed to git, records the md5 the run was trained on. Before every run the file's md5 is
compared with the `.dvc` file: a snapshot that changed behind DVC's back refuses to train.

Built-in datasets are written deterministically (fixed zip timestamps, fixed member order), so a
fresh clone that lacks the git-ignored data file rebuilds exactly the bytes the `.dvc` file names.
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


def track_snapshot(path: Path) -> SnapshotInfo:
    """`dvc add` a snapshot in the DVC repository that holds it (local cache only) and return its record."""
    root = find_dvc_root(path.parent)
    if root is None:
        raise DataError(
            f"data snapshot {path} is not inside a DVC repository",
            hint="run `git init && dvc init` (or `dvc init --no-scm`) at your project's root, then train again",
        )
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
