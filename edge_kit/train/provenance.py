"""Where a model came from: the three legs of reproducibility, at the granularity of one commit.

- code: the git commit of the config's repository and whether the working tree was dirty;
- environment: sha256 of the lock file, Python, platform, key library versions, CUDA, container image;
- data: the DVC md5 and path of the snapshot, and of the field data (`data.field`) with its capture counts.

Recorded as tags and an artifact of every MLflow run, and copied into every bundle's manifest.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edge_kit
from edge_kit.config import Config

if TYPE_CHECKING:
    from edge_kit.train.data import Dataset

KEY_PACKAGES = ("torch", "onnxruntime", "onnx", "numpy", "mlflow", "dvc", "scikit-learn", "neural-compressor")
LOCK_RELATIVE = Path("requirements") / "lock.txt"
# Set by our Dockerfiles' build argument, or by a platform that knows the digest it started.
IMAGE_DIGEST_ENV = "EDGEKIT_IMAGE_DIGEST"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


# `dvc repro` rewrites dvc.lock after each stage: it records results, not code, so a changed dvc.lock
# does not make the tree dirty (otherwise a pipeline's build stage could never reuse its train stage).
_NOT_CODE = ":(top,exclude,glob)**/dvc.lock"


def git_state(folder: Path) -> dict[str, Any]:
    """Commit of the repository holding ``folder`` and whether tracked or untracked (not ignored) files changed."""
    commit = _git(["rev-parse", "HEAD"], folder)
    if commit is None:
        return {"commit": None, "dirty": None, "root": None}
    status = _git(["status", "--porcelain", "--untracked-files=normal", "--", ":(top)", _NOT_CODE], folder)
    root = _git(["rev-parse", "--show-toplevel"], folder)
    return {"commit": commit, "dirty": bool(status), "root": root}


LOCK_ENV = "EDGEKIT_LOCK_FILE"  # set by our Dockerfile, where edge-kit is installed rather than checked out


def find_lock_file(start: Path) -> Path | None:
    """$EDGEKIT_LOCK_FILE, else the lock of the project holding ``start``, else the one of this edge-kit checkout."""
    if os.environ.get(LOCK_ENV):
        named = Path(os.environ[LOCK_ENV])
        return named if named.is_file() else None
    for folder in (start, *start.parents):
        candidate = folder / LOCK_RELATIVE
        if candidate.is_file():
            return candidate
    own = Path(edge_kit.__file__).resolve().parent.parent / LOCK_RELATIVE  # a source checkout of edge-kit
    return own if own.is_file() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def installed_sha256() -> str:
    """sha256 of every installed distribution's name==version: the environment as it is, lock or not."""
    pins = sorted(f"{(d.metadata['Name'] or '').lower()}=={d.version}" for d in metadata.distributions())
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()


def cuda_info() -> dict[str, Any] | None:
    """CUDA toolkit torch was built with and the device in use, or None on a CPU-only build."""
    try:
        import torch
    except ImportError:
        return None
    built = torch.version.cuda
    if built is None:
        return None
    available = torch.cuda.is_available()
    return {
        "version": built,
        "available": available,
        "device": torch.cuda.get_device_name(0) if available else None,
        "cudnn": torch.backends.cudnn.version() if available else None,
    }


def container_image() -> dict[str, Any] | None:
    """The container this runs in and its image digest, where the platform exposes it; None outside one."""
    digest = os.environ.get(IMAGE_DIGEST_ENV) or None
    containerenv = Path("/run/.containerenv")  # podman writes image name and id here
    if containerenv.is_file():
        fields = {}
        for line in containerenv.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip().strip('"')
        return {"runtime": "podman", "image": fields.get("image") or None,
                "digest": digest or fields.get("imageid") or None}
    if Path("/.dockerenv").exists():
        # Docker does not tell a container its image digest: only our build argument can.
        return {"runtime": "docker", "image": os.environ.get("EDGEKIT_IMAGE") or None, "digest": digest}
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return {"runtime": "kubernetes", "image": os.environ.get("EDGEKIT_IMAGE") or None, "digest": digest}
    if digest:
        return {"runtime": "unknown", "image": os.environ.get("EDGEKIT_IMAGE") or None, "digest": digest}
    return None


def environment_info(config_root: Path) -> dict[str, Any]:
    lock = find_lock_file(config_root)
    return {
        "lock_path": str(lock) if lock else None,
        "lock_sha256": sha256_file(lock) if lock else None,
        "installed_sha256": installed_sha256(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda": cuda_info(),
        "container_image": container_image(),
    }


def collect_provenance(config: Config, dataset: Dataset | None = None) -> dict[str, Any]:
    """{"git": {"commit", "dirty"}, "environment": {...}, "data": {"dvc_md5", "path"}} for this config."""
    git = git_state(config.root)
    data: dict[str, Any] = {"dvc_md5": None, "path": None}
    if dataset is not None:
        snapshot = dataset.snapshot
        data = {"dvc_md5": snapshot.dvc_md5, "path": _relative(snapshot.path, config.root),
                "dvc_file": _relative(snapshot.dvc_file, config.root), "split_sha256": dataset.split_sha256}
        if dataset.field is not None:
            data["field"] = field_provenance(config, dataset)
    return {
        "git": {"commit": git["commit"], "dirty": git["dirty"]},
        "environment": environment_info(config.root),
        "data": data,
    }


def field_provenance(config: Config, dataset: Dataset) -> dict[str, Any]:
    """The field data's record: md5, file, .dvc file, rows per split and per device, and what its manifest
    (`data/field-manifest.json`, written by `edge-kit data add`) says of the captures it holds."""
    from edge_kit.train.field_data import manifest_summary

    field = dataset.field
    assert field is not None
    snap = field.snapshot
    return {"dvc_md5": snap.dvc_md5, "path": _relative(snap.path, config.root),
            "dvc_file": _relative(snap.dvc_file, config.root), "rows": field.rows, "train_rows": field.train_rows,
            "test_rows": field.test_rows, "devices": dict(field.devices), "label_sources": dict(field.label_sources),
            "captures": manifest_summary(snap.path, snap.dvc_md5)}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
