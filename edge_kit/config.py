"""The project config (TOML, docs/architecture.md section 4): load, validate, resolve paths.

Validation is strict on purpose: an unknown key is a typo until proven otherwise, and a typo that
is silently ignored trains the wrong model. Every error names the dotted key and what is allowed.

Each key is declared once, with its default, a one-line description and its rule (bounds, choices
or a check), by `setting` (`device_agent.settings_schema`, shared with the fleet and agent configs);
docs/config.md is generated from these declarations:

    python -m edge_kit.config --markdown > docs/config.md     # or: make docs
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.settings_schema import (
    THREADS_DOC,
    ConfigPage,
    check_rules,
    setting,
)
from device_agent.strict_toml import check_sections, read_toml, section_values
from edge_kit.errors import ConfigError

__all__ = ["PAGE", "SECTIONS", "Config", "ConfigError", "load_config", "parse_config"]


# -- the project config -------------------------------------------------------------------

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine", "iris")
QUANT_BACKENDS = ("ort", "inc")
TARGETS = ("auto", "x86-vnni", "x86-avx2", "arm64")
GATE_METRICS = ("accuracy",)
TRAIN_DEVICES = ("auto", "cpu", "cuda")
TRAIN_ENGINES = ("local", "ray")
OBJECTIVES = ("latency", "throughput", "size")


def calibration_methods() -> tuple[str, ...]:
    """The calibration presets `calibration.methods` defines (the one list of their names).

    Imported when a config is checked, not when this module is: `calibration` loads ONNX Runtime's
    quantization tools, and `--help` and the fleet never need them.
    """
    from calibration.methods import CALIBRATION_METHODS

    return tuple(CALIBRATION_METHODS)


def check_source(key: str, source: str, c: Any) -> None:
    kind, _, rest = source.partition(":")
    if kind == "sklearn":
        if rest not in SKLEARN_DATASETS:
            raise ConfigError(key, f"unknown dataset {rest!r}", hint=f"allowed: {SKLEARN_DATASETS}")
    elif kind in ("npz", "csv"):
        if not rest:
            raise ConfigError(key, f"'{kind}:' needs a path, e.g. '{kind}:data/train.{kind}'")
        try:
            found = c.resolve(rest).is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL, a symlink loop
            raise ConfigError(key, f"cannot use {rest!r} as a path: {exc}") from exc
        if not found:
            raise ConfigError(key, f"file not found: {c.resolve(rest)}")
        if kind == "csv" and not c.data.label_column:
            raise ConfigError("data.label_column", "is required for a csv source")
    else:
        raise ConfigError(key, f"unknown source {source!r}", hint="use sklearn:NAME, npz:PATH or csv:PATH")


def check_field(key: str, path: str, c: Any) -> None:
    """The field data file `edge-kit data add` writes: an `.npz` path relative to the config (it may be missing
    on a fresh clone until `dvc pull`/`dvc checkout` restores it; training then says so)."""
    if not path.endswith(".npz"):
        raise ConfigError(key, f"must name an .npz file (what `edge-kit data add` writes), got {path!r}")
    try:
        c.resolve(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot use {path!r} as a path: {exc}") from exc


def check_engine_only(key: str, value: Any, c: Any) -> None:
    """`workers` and `use_gpu` describe a Ray Train worker group; the local engine trains in one process."""
    default = 1 if key.endswith("workers") else False
    if c.train.engine == "local" and value != default:
        raise ConfigError(key, "applies to engine = \"ray\" only (the local engine trains in one process on "
                          "train.device)", hint="set train.engine = \"ray\", or remove the key")


def check_factory(key: str, factory: str, c: Any) -> None:
    if ":" not in factory:
        raise ConfigError(key, f"must look like 'module:function', got {factory!r}")


@dataclass(frozen=True)
class ProjectSection:
    """Names the model: the bundle is written as `<name>-<version>.edgebundle`."""

    name: str = setting("model", "model name, written into the bundle's manifest and file name")
    version: str = setting("1.0.0", "model version, written into the bundle's manifest and file name")


@dataclass(frozen=True)
class DataSection:
    """Where the training data comes from and how it is split."""

    source: str = setting("sklearn:digits", "`sklearn:NAME`, `npz:PATH` (arrays X, y) or `csv:PATH`",
                          check=check_source,
                          allowed=f"sklearn:{'/'.join(SKLEARN_DATASETS)}, npz:PATH, csv:PATH (file must exist)")
    test_fraction: float = setting(0.2, "share of the data held out for evaluation and the accuracy gate",
                                   lo=0.0, hi=1.0, open_lo=True, open_hi=True)
    seed: int = setting(0, "seed of the train/test split")
    label_column: str | None = setting(None, "the label column of a `csv:` source (required there)")
    # Set by `edge-kit data add` (docs/captures.md); its rows are split like the source's and added to both splits.
    field: str | None = setting(None, "field data added by `edge-kit data add` (an .npz tracked by its .dvc file), "
                                "trained on besides `source`", check=check_field, allowed="PATH.npz")


@dataclass(frozen=True)
class ModelSection:
    """The model to train, built by a factory function."""

    factory: str = setting("edge_kit.models:small_cnn",
                           "`module:function` returning the torch model, importable from the config's folder",
                           check=check_factory, allowed="module:function")
    kwargs: dict[str, Any] = setting(dict, "keyword arguments passed to the factory")


@dataclass(frozen=True)
class TrainSection:
    """Training: epochs, optimiser, checkpointing."""

    epochs: int = setting(15, "passes over the training data", lo=1)
    batch_size: int = setting(64, "samples per optimizer step", lo=1)
    lr: float = setting(1e-3, "learning rate", lo=0.0, open_lo=True)
    seed: int = setting(0, "seed of weight init and batch shuffling")
    checkpoint_every: int = setting(50, "optimizer steps between checkpoints (resume point after a crash)", lo=1)
    keep_checkpoints: int = setting(3, "checkpoints kept on disk, newest first", lo=1)
    device: str = setting("auto", "where to train: `auto` takes CUDA when present", choices=TRAIN_DEVICES)
    # Part of what makes a run bitwise repeatable; small models train fastest on one thread, above
    # all on a shared machine.
    threads: int = setting(1, f"CPU threads for training (torch); {THREADS_DOC}", lo=0)
    # Ray Train with DistributedDataParallel (docs/training.md); `storage` holds its checkpoints.
    engine: str = setting("local", "`ray` trains on a Ray cluster (Ray Train, DDP) instead of this process",
                          choices=TRAIN_ENGINES)
    workers: int = setting(1, "Ray Train workers (engine = \"ray\" only)", lo=1, check=check_engine_only)
    use_gpu: bool = setting(False, "one GPU per Ray Train worker (engine = \"ray\" only)", check=check_engine_only)
    storage: str = setting("", "Ray checkpoints: a path (relative to the config) or a pyarrow filesystem URI; "
                           "empty = `.edgekit/ray/`")


@dataclass(frozen=True)
class QuantizeSection:
    """Int8 quantization: backend, calibration, target CPU."""

    backend: str = setting("ort", "quantizer: ONNX Runtime (`ort`) or Intel Neural Compressor (`inc`)",
                           choices=QUANT_BACKENDS)
    calibration: str = setting("minmax", "how activation ranges are estimated from the calibration samples",
                               choices=calibration_methods)
    calibration_samples: int = setting(256, "training samples used for calibration", lo=1)
    per_channel: bool = setting(True, "per-channel weight scales (more accurate) instead of per-tensor")
    target: str = setting("x86-vnni", "CPU the int8 model is tuned for; `auto` picks the build host's", choices=TARGETS)
    # The candidate search after the gate (edge_kit/compile/search.py), timed on the build host.
    objective: str = setting("latency", "what the candidate search ships: the fastest call, the most samples "
                             "per second, or the smallest file", choices=OBJECTIVES)
    batch_size: int = setting(1, "batch size the candidates are timed at", lo=1)
    threads: int = setting(1, f"ONNX Runtime intra-op threads the candidates are timed with; {THREADS_DOC}",
                           lo=0)
    search_seconds: float = setting(3.0, "time budget of the candidate search; 0 ships the gate's choice untimed",
                                    lo=0.0, hi=3600.0)
    allow_fp32: bool = setting(False, "let an fp32 model ship when it is the fastest candidate that passes")


@dataclass(frozen=True)
class GateSection:
    """The accuracy gate: how much the int8 model may lose against fp32 before the build fails (exit 3)."""

    metric: str = setting("accuracy", "metric compared between fp32 and int8 on the test split", choices=GATE_METRICS)
    max_drop: float = setting(0.01, "largest allowed absolute drop of the metric", lo=0.0, hi=1.0)
    max_relative_drop: float | None = setting(None, "largest allowed drop relative to fp32 (optional)",
                                              lo=0.0, hi=1.0)
    max_fallback_rounds: int = setting(4, "rounds of moving culprit nodes back to fp32 before giving up", lo=0)
    # A "repair" that keeps most of the model in fp32 passes the accuracy gate but is not an int8 model.
    min_int8_coverage: float = setting(0.5, "least share of multiply-accumulates an int8 bundle runs in int8 "
                                       "(exit 3 under it)", lo=0.0, hi=1.0)


@dataclass(frozen=True)
class MonitorSection:
    """Drift monitoring: the reference histograms written into the bundle."""

    bins: int = setting(32, "histogram bins per monitored channel", lo=2, hi=256)
    reference: str = setting("base", "rows the reference histograms describe: `base` = the data source's rows "
                             "only (what the model was designed for), `all` = with the field rows of "
                             "`data.field` (docs/captures.md)", choices=("base", "all"))


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


SECTIONS: dict[str, type] = {
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
    check_sections(raw, SECTIONS)
    sections = {name: cls(**section_values(name, cls, raw.get(name, {}))) for name, cls in SECTIONS.items()}
    config = Config(path=config_path, **sections)
    check_rules(config, SECTIONS)
    return config


CONFIG_DOC_INTRO = """\
<!-- Generated from edge_kit/config.py by `make docs` (python -m edge_kit.config --markdown): do not edit. -->

The project config is one TOML file (`edgekit.toml`), passed as `--config` to `edge-kit train`, `build`,
`reproduce` and `bench`. Sections and keys left out take the defaults below. Every path is relative to the
config file's folder. An unknown section or key, a value of the wrong type or outside what is allowed is an
error naming the dotted key (exit code 2), never ignored. The other configs: [fleet](config-fleet.md) (`edge-kit
fleet serve --config`), [agent](config-agent.md) (`edge-agent run --config`)."""


PAGE = ConfigPage("Project config reference", CONFIG_DOC_INTRO, SECTIONS)

if __name__ == "__main__":
    raise SystemExit(PAGE.main("python -m edge_kit.config"))
