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
max_device_weight = 1.0      # in a fleet bucket a device counts at most this x the median device's n (0: no cap)
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
max_inferences_per_second = 100000  # a window's n may be at most its length x this (at least 1 s)
batch_size = 256             # messages per storage transaction (one fsync each)
offline_after_seconds = 180  # a device not heard from for this long is shown offline
```
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.strict_toml import check_sections, check_value, read_toml, section_values
from edge_kit.errors import ConfigError


@dataclass(frozen=True)
class DriftSettings:
    alpha: float = 0.01
    min_n: int = 100
    k: int = 2
    m: int = 3
    effect_wasserstein: float = 0.1
    effect_class_tvd: float = 0.05
    fleet_window_seconds: float = 300.0
    max_device_weight: float = 1.0
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
    max_inferences_per_second: float = 100000.0
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
    return parse_settings(read_toml(path, "fleet config"))


def parse_settings(raw: dict[str, Any]) -> FleetSettings:
    check_sections(raw, _SECTIONS)
    sections = {name: cls(**section_values(name, cls, raw.get(name, {}), _typed)) for name, cls in _SECTIONS.items()}
    settings = FleetSettings(**sections)
    _check_values(settings)
    return settings


def _typed(key: str, value: Any, spec: str) -> Any:
    if spec == "list[str]" and isinstance(value, str):
        return shlex.split(value)  # a shell-style command string is split like a shell would
    return check_value(key, value, spec)


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
        "ingest.max_inferences_per_second": s.ingest.max_inferences_per_second,
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
        "drift.max_device_weight": d.max_device_weight,
        "concept.max_accuracy_drop": s.concept.max_accuracy_drop,
        "alerts.retrain_min_interval_seconds": s.alerts.retrain_min_interval_seconds,
        "ingest.max_clock_skew_seconds": s.ingest.max_clock_skew_seconds,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
    if s.alerts.approval not in ("manual", "auto"):
        raise ConfigError("alerts.approval", f"must be 'manual' or 'auto', got {s.alerts.approval!r}")
