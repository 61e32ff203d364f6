"""Fleet config (TOML): drift thresholds, alert rule, retraining command, ingest limits.

Strict like the project config: an unknown key is an error naming the key (exit 2), because a
misspelt threshold silently left at its default is the kind of mistake nobody notices until an
incident. Every section and key may be left out; the defaults below are what `fleet serve` uses.

```toml
[drift]
alpha = 0.01                 # family-wise (Bonferroni, per model) / false discovery (BH, across devices)
min_n = 100                  # windows with fewer inferences are not tested
k = 2                        # an alert needs k flagged windows ...
m = 3                        # ... among the last m tested windows
effect_wasserstein = 0.1     # practical threshold, numeric channels: Wasserstein in reference sd units
effect_class_tvd = 0.05      # practical threshold, predicted class: total variation distance
fleet_window_seconds = 300   # device windows starting in the same bucket are pooled for the fleet test
lookback_seconds = 86400     # only windows newer than this are evaluated
evaluate_every_seconds = 10

[concept]
max_accuracy_drop = 0.05     # alert when labelled accuracy is this far below the gate's int8 accuracy
min_labels = 200

[alerts]
approval = "manual"          # "manual": an operator approves before retraining; "auto": run at once
retrain_command = []         # e.g. ["edge-kit", "build", "--config", "edgekit.toml", "--out", "dist", "--unsigned"]
retrain_min_interval_seconds = 3600
retrain_timeout_seconds = 3600

[ingest]
max_payload_bytes = 262144
max_clock_skew_seconds = 300 # a window ending later than now + this is refused
max_window_seconds = 86400
batch_size = 256             # messages per storage transaction (one fsync each)
offline_after_seconds = 180  # a device not heard from for this long is shown offline
```
"""

from __future__ import annotations

import dataclasses
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_kit.errors import ConfigError, UsageError


@dataclass(frozen=True)
class DriftSettings:
    alpha: float = 0.01
    min_n: int = 100
    k: int = 2
    m: int = 3
    effect_wasserstein: float = 0.1
    effect_class_tvd: float = 0.05
    fleet_window_seconds: float = 300.0
    lookback_seconds: float = 86400.0
    evaluate_every_seconds: float = 10.0


@dataclass(frozen=True)
class ConceptSettings:
    max_accuracy_drop: float = 0.05
    min_labels: int = 200


@dataclass(frozen=True)
class AlertSettings:
    approval: str = "manual"
    retrain_command: list[str] = field(default_factory=list)
    retrain_min_interval_seconds: float = 3600.0
    retrain_timeout_seconds: float = 3600.0


@dataclass(frozen=True)
class IngestSettings:
    max_payload_bytes: int = 256 * 1024
    max_clock_skew_seconds: float = 300.0
    max_window_seconds: float = 86400.0
    batch_size: int = 256
    offline_after_seconds: float = 180.0


@dataclass(frozen=True)
class FleetSettings:
    drift: DriftSettings = field(default_factory=DriftSettings)
    concept: ConceptSettings = field(default_factory=ConceptSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "drift": DriftSettings,
    "concept": ConceptSettings,
    "alerts": AlertSettings,
    "ingest": IngestSettings,
}


def load_settings(path: str | Path | None) -> FleetSettings:
    """Defaults when `path` is None; otherwise read and validate the TOML file (ConfigError, exit 2)."""
    if path is None:
        return FleetSettings()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"fleet config not found: {path}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"fleet config {path} is not valid TOML: {exc}") from exc
    return parse_settings(raw)


def parse_settings(raw: dict[str, Any]) -> FleetSettings:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], "unknown section", hint=f"allowed: {', '.join(_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(name, f"must be a table, got {type(table).__name__}")
        sections[name] = _section(name, cls, table)
    settings = FleetSettings(**sections)
    _check_values(settings)
    return settings


def _section(section: str, cls: type, table: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", "unknown key", hint=f"allowed: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        values[key] = _typed(f"{section}.{key}", value, str(fields[key].type))
    return cls(**values)


def _typed(key: str, value: Any, spec: str) -> Any:
    if spec == "list[str]":
        if isinstance(value, str):  # a shell-style string is accepted and split like a shell would
            return shlex.split(value)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(key, "must be a list of strings (the command and its arguments)")
        return list(value)
    if isinstance(value, bool):
        raise ConfigError(key, f"must be {spec}, got a boolean")
    if spec == "float" and isinstance(value, int | float):
        return float(value)
    if spec == "int" and isinstance(value, int):
        return value
    if spec == "str" and isinstance(value, str):
        return value
    raise ConfigError(key, f"must be {spec}, got {type(value).__name__} {value!r}")


def _check_values(s: FleetSettings) -> None:
    d = s.drift
    if not 0.0 < d.alpha < 0.5:
        raise ConfigError("drift.alpha", f"must be in (0, 0.5), got {d.alpha}")
    if d.m < 1 or not 1 <= d.k <= d.m:
        raise ConfigError("drift.k", f"need 1 <= k <= m, got k={d.k}, m={d.m}")
    positive = {
        "drift.min_n": d.min_n,
        "drift.fleet_window_seconds": d.fleet_window_seconds,
        "drift.lookback_seconds": d.lookback_seconds,
        "drift.evaluate_every_seconds": d.evaluate_every_seconds,
        "concept.min_labels": s.concept.min_labels,
        "ingest.max_payload_bytes": s.ingest.max_payload_bytes,
        "ingest.max_window_seconds": s.ingest.max_window_seconds,
        "ingest.batch_size": s.ingest.batch_size,
        "ingest.offline_after_seconds": s.ingest.offline_after_seconds,
        "alerts.retrain_timeout_seconds": s.alerts.retrain_timeout_seconds,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(key, f"must be positive, got {value}")
    non_negative = {
        "drift.effect_wasserstein": d.effect_wasserstein,
        "drift.effect_class_tvd": d.effect_class_tvd,
        "concept.max_accuracy_drop": s.concept.max_accuracy_drop,
        "alerts.retrain_min_interval_seconds": s.alerts.retrain_min_interval_seconds,
        "ingest.max_clock_skew_seconds": s.ingest.max_clock_skew_seconds,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
    if s.alerts.approval not in ("manual", "auto"):
        raise ConfigError("alerts.approval", f"must be 'manual' or 'auto', got {s.alerts.approval!r}")
