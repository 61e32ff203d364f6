"""The project config (TOML, DESIGN.md section 4): load, validate, resolve paths.

Validation is strict on purpose: an unknown key is a typo until proven otherwise, and a typo that
is silently ignored trains the wrong model. Every error names the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.strict_toml import check_sections, read_toml, section_values
from edge_kit.errors import ConfigError

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine", "iris")
QUANT_BACKENDS = ("ort", "inc")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("auto", "x86-vnni", "x86-avx2", "arm64")
GATE_METRICS = ("accuracy",)
OBJECTIVES = ("latency", "throughput", "size")


@dataclass(frozen=True)
class ProjectSection:
    name: str = "model"
    version: str = "1.0.0"


@dataclass(frozen=True)
class DataSection:
    source: str = "sklearn:digits"
    test_fraction: float = 0.2
    seed: int = 0
    label_column: str | None = None


@dataclass(frozen=True)
class ModelSection:
    factory: str = "edge_kit.models:small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    device: str = "auto"
    # CPU threads for training (0 = torch's default, all cores). Part of what makes a run bitwise
    # repeatable, and small models train fastest on one thread, above all on a shared machine.
    threads: int = 1


@dataclass(frozen=True)
class QuantizeSection:
    backend: str = "ort"
    calibration: str = "minmax"
    calibration_samples: int = 256
    per_channel: bool = True
    target: str = "x86-vnni"
    # The candidate search after the gate (edge_kit/compile/search.py): what "fastest" means, the
    # settings it is timed at on the build host, how long the timing may take (0 = no search: ship
    # the gate's choice), and whether an fp32 model may ship when it wins.
    objective: str = "latency"
    batch_size: int = 1
    threads: int = 1
    search_seconds: float = 3.0
    allow_fp32: bool = False


@dataclass(frozen=True)
class GateSection:
    metric: str = "accuracy"
    max_drop: float = 0.01
    max_relative_drop: float | None = None
    max_fallback_rounds: int = 4
    # Least share of multiply-accumulates an int8 bundle must run in int8 (exit 3 under it): a "repair"
    # that keeps most of the model in fp32 passes the accuracy gate but is not an int8 model.
    min_int8_coverage: float = 0.5


@dataclass(frozen=True)
class MonitorSection:
    bins: int = 32


@dataclass(frozen=True)
class Config:
    """A validated project config. ``root`` is the config file's folder: every path is relative to it."""

    path: Path
    project: ProjectSection = field(default_factory=ProjectSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    gate: GateSection = field(default_factory=GateSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def workdir(self) -> Path:
        """Where the pipeline keeps its state (snapshots, checkpoints, tracking store) for this project."""
        return self.root / ".edgekit"

    def ensure_workdir(self) -> Path:
        """Create `.edgekit/` with a `.gitignore` of its own (as pytest and mypy do for their caches), so
        pipeline state never makes a user's git tree dirty, whatever their own .gitignore says."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        marker = self.workdir / ".gitignore"
        if not marker.exists():
            marker.write_text("# Created by edge-kit: pipeline state (snapshot split, checkpoints, MLflow store).\n*\n")
        return self.workdir

    def resolve(self, relative: str | Path) -> Path:
        return (self.root / relative).resolve()

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved config (defaults filled in), as logged to MLflow."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "path":
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        return out

    def fingerprint(self) -> str:
        """sha256 of the resolved config: runs with the same fingerprint trained the same thing."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


_SECTIONS: dict[str, type] = {
    "project": ProjectSection,
    "data": DataSection,
    "model": ModelSection,
    "train": TrainSection,
    "quantize": QuantizeSection,
    "gate": GateSection,
    "monitor": MonitorSection,
}


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config. Raises ConfigError (exit 2) naming the offending key."""
    return parse_config(read_toml(path), Path(path).resolve())


def parse_config(raw: dict[str, Any], config_path: Path) -> Config:
    check_sections(raw, _SECTIONS)
    sections = {name: cls(**section_values(name, cls, raw.get(name, {}))) for name, cls in _SECTIONS.items()}
    config = Config(path=config_path, **sections)
    _check_values(config)
    return config


def _check_values(c: Config) -> None:
    _check_source(c)
    if not 0.0 < c.data.test_fraction < 1.0:
        raise ConfigError("data.test_fraction", f"must be between 0 and 1, got {c.data.test_fraction}")
    if ":" not in c.model.factory:
        raise ConfigError("model.factory", f"must look like 'module:function', got {c.model.factory!r}")
    positive = {
        "train.epochs": c.train.epochs,
        "train.batch_size": c.train.batch_size,
        "train.checkpoint_every": c.train.checkpoint_every,
        "train.keep_checkpoints": c.train.keep_checkpoints,
        "quantize.calibration_samples": c.quantize.calibration_samples,
        "quantize.batch_size": c.quantize.batch_size,
        "quantize.threads": c.quantize.threads,
        "monitor.bins": c.monitor.bins,
    }
    for key, count in positive.items():
        if count < 1:
            raise ConfigError(key, f"must be at least 1, got {count}")
    if c.train.threads < 0:
        raise ConfigError("train.threads", f"must be 0 (all cores) or more, got {c.train.threads}")
    if not c.train.lr > 0:
        raise ConfigError("train.lr", f"must be positive, got {c.train.lr}")
    if c.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("train.device", f"must be one of auto, cpu, cuda, got {c.train.device!r}")
    choices = {
        "quantize.backend": (c.quantize.backend, QUANT_BACKENDS),
        "quantize.calibration": (c.quantize.calibration, CALIBRATION_METHODS),
        "quantize.target": (c.quantize.target, TARGETS),
        "quantize.objective": (c.quantize.objective, OBJECTIVES),
        "gate.metric": (c.gate.metric, GATE_METRICS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not allowed", hint=f"allowed: {', '.join(allowed)}")
    if not 0.0 <= c.quantize.search_seconds <= 3600.0:
        raise ConfigError("quantize.search_seconds", f"must be between 0 (no search) and 3600, "
                          f"got {c.quantize.search_seconds}")
    if not 0.0 <= c.gate.max_drop <= 1.0:
        raise ConfigError("gate.max_drop", f"must be between 0 and 1, got {c.gate.max_drop}")
    if c.gate.max_relative_drop is not None and not 0.0 <= c.gate.max_relative_drop <= 1.0:
        raise ConfigError("gate.max_relative_drop", f"must be between 0 and 1, got {c.gate.max_relative_drop}")
    if not 0.0 <= c.gate.min_int8_coverage <= 1.0:
        raise ConfigError("gate.min_int8_coverage", f"must be between 0 and 1, got {c.gate.min_int8_coverage}")
    if c.gate.max_fallback_rounds < 0:
        raise ConfigError("gate.max_fallback_rounds", "must be 0 or more")
    if not 2 <= c.monitor.bins <= 256:
        raise ConfigError("monitor.bins", f"must be between 2 and 256, got {c.monitor.bins}")


def _check_source(c: Config) -> None:
    kind, _, rest = c.data.source.partition(":")
    if kind == "sklearn":
        if rest not in SKLEARN_DATASETS:
            raise ConfigError("data.source", f"unknown dataset {rest!r}", hint=f"allowed: {SKLEARN_DATASETS}")
    elif kind in ("npz", "csv"):
        if not rest:
            raise ConfigError("data.source", f"'{kind}:' needs a path, e.g. '{kind}:data/train.{kind}'")
        if not c.resolve(rest).is_file():
            raise ConfigError("data.source", f"file not found: {c.resolve(rest)}")
        if kind == "csv" and not c.data.label_column:
            raise ConfigError("data.label_column", "is required for a csv source")
    else:
        raise ConfigError(
            "data.source", f"unknown source {c.data.source!r}", hint="use sklearn:NAME, npz:PATH or csv:PATH"
        )
