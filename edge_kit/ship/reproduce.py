"""`edge-kit reproduce`: rebuild a bundle from its provenance and compare model.onnx byte for byte.

First the inputs: the current git commit, the lock file and the data snapshot must be the ones
the bundle names (otherwise a difference would prove nothing). Then the whole pipeline runs again
with all of its state (split, checkpoints, MLflow store, outputs) in a temporary directory, so
training is redone from scratch rather than reused, the project's own `.edgekit/` is left alone,
and the two model.onnx files are compared. On the same machine they must be identical: training is
seeded and deterministic on CPU, calibration uses the recorded ids, quantization is deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from device_agent.bundle.format import read_bundle, sha256_hex
from edge_kit.config import Config
from edge_kit.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IsolatedConfig(Config):
    """The same config with the pipeline's state folder moved (the data snapshot stays where it is)."""

    state_dir: Path = Path(".edgekit")

    @property
    def workdir(self) -> Path:
        return self.state_dir

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(Config)
                if f.name != "path"}


def isolated(config: Config, state_dir: Path) -> IsolatedConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)}
    return IsolatedConfig(**fields, state_dir=state_dir)


@dataclass
class ReproduceResult:
    identical: bool
    original_sha256: str
    rebuilt_sha256: str
    diff: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"identical": self.identical, "original_sha256": self.original_sha256,
                "rebuilt_sha256": self.rebuilt_sha256, "diff": self.diff, "checks": self.checks}


def check_provenance(manifest: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Compare the bundle's recorded inputs with the current ones; UsageError naming each mismatch."""
    rec = manifest.get("provenance", {})
    pairs = {
        "git commit": (rec.get("git", {}).get("commit"), current["git"]["commit"]),
        "lock sha256": (rec.get("environment", {}).get("lock_sha256"), current["environment"]["lock_sha256"]),
        "data dvc md5": (rec.get("data", {}).get("dvc_md5"), current["data"]["dvc_md5"]),
        # Field data (`edge-kit data add`); the commit pins its .dvc file too, but this names the culprit.
        "field data dvc md5": ((rec.get("data", {}).get("field") or {}).get("dvc_md5"),
                               (current["data"].get("field") or {}).get("dvc_md5")),
    }
    mismatches = [f"{what}: bundle {a!r}, now {b!r}" for what, (a, b) in pairs.items() if a != b]
    if rec.get("git", {}).get("dirty"):
        mismatches.append("the bundle was built from a working tree with uncommitted changes")
    if current["git"].get("dirty"):
        mismatches.append("the working tree has uncommitted changes; commit or stash them first")
    if mismatches:
        raise UsageError("cannot reproduce: the current inputs differ from the bundle's provenance: "
                         + "; ".join(mismatches))
    return {what: a for what, (a, _) in pairs.items()}


def onnx_diff(a: bytes, b: bytes, limit: int = 20) -> list[str]:
    """Human-readable differences between two ONNX models: nodes, attributes, initializer values."""
    ma, mb = onnx.load_from_string(a), onnx.load_from_string(b)
    out: list[str] = [f"model.onnx: {len(a)} bytes (bundle) vs {len(b)} bytes (rebuilt)"]
    na = {n.name: n for n in ma.graph.node}
    nb = {n.name: n for n in mb.graph.node}
    out += [f"node only in bundle: {n} ({na[n].op_type})" for n in sorted(set(na) - set(nb))]
    out += [f"node only in rebuild: {n} ({nb[n].op_type})" for n in sorted(set(nb) - set(na))]
    for name in sorted(set(na) & set(nb)):
        if na[name].SerializeToString() != nb[name].SerializeToString():
            out.append(f"node differs: {name} ({na[name].op_type})")
    ia = {t.name: t for t in ma.graph.initializer}
    ib = {t.name: t for t in mb.graph.initializer}
    out += [f"initializer only in bundle: {n}" for n in sorted(set(ia) - set(ib))]
    out += [f"initializer only in rebuild: {n}" for n in sorted(set(ib) - set(ia))]
    for name in sorted(set(ia) & set(ib)):
        if ia[name].SerializeToString() == ib[name].SerializeToString():
            continue
        va, vb = numpy_helper.to_array(ia[name]), numpy_helper.to_array(ib[name])
        if va.shape != vb.shape:
            out.append(f"initializer {name}: shape {va.shape} vs {vb.shape}")
        else:
            delta = np.abs(va.astype(np.float64) - vb.astype(np.float64))
            out.append(f"initializer {name}: {int((delta > 0).sum())} of {va.size} values differ, max |diff| "
                       f"{float(delta.max()):.6g}")
    if len(out) == 1:
        out.append("graphs are equal node by node; the bytes differ in metadata (producer, opset or doc strings)")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def reproduce(bundle_path: str | Path, config: Config, *, workdir: Path | None = None) -> ReproduceResult:
    from edge_kit.ship.build import build
    from edge_kit.train.data import load_dataset
    from edge_kit.train.provenance import collect_provenance

    bundle = read_bundle(bundle_path)
    manifest = bundle.manifest
    if (manifest.get("name"), manifest.get("version")) != (config.project.name, config.project.version):
        raise UsageError(f"bundle is {manifest.get('name')} {manifest.get('version')} but the config builds "
                         f"{config.project.name} {config.project.version}")
    checks = check_provenance(manifest, collect_provenance(config, load_dataset(config)))
    quantization = manifest.get("quantization", {})
    backend = quantization.get("backend")
    # Replay the bundle's decisions rather than re-take them: the candidate its search shipped (timings
    # vary run to run) and, for target = "auto", the preset it resolved to on the host it was built on.
    replay = quantization.get("search")
    if config.quantize.target == "auto" and quantization.get("target"):
        config = dataclasses.replace(config, quantize=dataclasses.replace(config.quantize,
                                                                           target=quantization["target"]))
    with tempfile.TemporaryDirectory(prefix="edgekit-reproduce-", dir=workdir) as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        log.info("rebuilding %s %s from scratch in %s", config.project.name, config.project.version, tmp)
        rebuilt = build(isolated(config, state), Path(tmp) / "out", signing_key=None, backend=backend,
                        tracking_uri=f"sqlite:///{state / 'mlflow.db'}", register=False, workdir=Path(tmp),
                        reuse=False, resume="never", replay=replay)
        new_bytes = read_bundle(rebuilt.bundle).model_bytes
    old_bytes = bundle.model_bytes
    identical = old_bytes == new_bytes
    diff = [] if identical else onnx_diff(old_bytes, new_bytes)
    return ReproduceResult(identical, sha256_hex(old_bytes), sha256_hex(new_bytes), diff, checks)
