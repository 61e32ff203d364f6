"""Fleet config (TOML, `fleet serve --config`): drift thresholds, alert rule, retraining command, ingest limits.

Strict like the project config: an unknown key is an error naming the key (exit 2), because a
misspelt threshold silently left at its default is the kind of mistake nobody notices until an
incident. Every section and key may be left out. Each key is declared once, with its default,
description and rule, by `setting` (`device_agent.settings_schema`); docs/config-fleet.md is generated
from these declarations (`make docs`).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.settings_schema import POSITIVE, ConfigPage, check_rules, setting, subsection
from device_agent.strict_toml import check_sections, check_value, read_toml, section_values
from edge_kit.errors import ConfigError


def _k_within_m(key: str, k: int, s: Any) -> None:
    if k > s.drift.m:
        raise ConfigError(key, f"need 1 <= k <= m, got k={k}, m={s.drift.m}")


@dataclass(frozen=True)
class DriftSettings:
    """Data drift: the statistical tests on each window and the alert rule (docs/fleet.md, "Drift tests")."""

    alpha: float = setting(0.01, "significance: family-wise per model (Bonferroni over channels), false "
                           "discovery rate across devices (Benjamini-Hochberg)", lo=0.0, hi=0.5,
                           open_lo=True, open_hi=True)
    min_n: int = setting(100, "windows with fewer inferences are not tested on their own", lo=1)
    k: int = setting(2, "an alert needs k flagged windows among the last m tested", lo=1, check=_k_within_m,
                     allowed="at most m")
    m: int = setting(3, "how many of the latest tested windows the k-of-m rule looks at", lo=1)
    effect_wasserstein: float = setting(0.1, "practical threshold for numeric channels: Wasserstein-1 distance "
                                        "in reference standard deviations", lo=0.0)
    effect_class_tvd: float = setting(0.05, "practical threshold for the predicted class: total variation "
                                      "distance", lo=0.0)
    fleet_window_seconds: float = setting(300.0, "device windows starting in the same bucket of this length are "
                                          "pooled for the fleet-wide test", **POSITIVE)
    max_device_weight: float = setting(1.0, "in a fleet bucket a device counts at most this x the (lower) median "
                                       "device's n; 0 = no cap", lo=0.0)
    max_design_effect: float = setting(16.0, "the design effect phi a window's dependence signal (dispersion, "
                                       "repeated inputs) may claim; tests use n / phi", lo=1.0)
    lookback_seconds: float = setting(86400.0, "only windows newer than this are evaluated", **POSITIVE)
    evaluate_every_seconds: float = setting(10.0, "seconds between drift evaluations", **POSITIVE)


@dataclass(frozen=True)
class ConceptSettings:
    """Concept drift: accuracy from the labels devices send back, against the gate's int8 accuracy."""

    max_accuracy_drop: float = setting(0.05, "alert when labelled accuracy is this far below the gate's int8 "
                                       "accuracy (and a one-sided binomial test at alpha agrees)", lo=0.0)
    min_labels: int = setting(200, "labels needed before accuracy is judged", lo=1)
    max_device_weight: float = setting(1.0, "a device's labels count at most this x the (lower) median "
                                       "device's number of labels; 0 = no cap", lo=0.0)


@dataclass(frozen=True)
class AlertSettings:
    """Alerts: who approves retraining, and the command that retrains."""

    approval: str = setting("manual", "`manual`: an operator approves an alert before retraining; `auto`: "
                            "the command runs at once", choices=("manual", "auto"))
    retrain_command: list[str] = setting(list, "command run on an approved alert, as a list or one "
                                         "shell-style string, e.g. `[\"edge-kit\", \"build\", \"--config\", "
                                         "\"edgekit.toml\", \"--out\", \"dist\", \"--key\", \"k.pem\"]`; "
                                         "empty = alerts only")
    retrain_min_interval_seconds: float = setting(3600.0, "the command runs at most once per this many seconds, "
                                                  "across all alerts", lo=0.0)
    retrain_timeout_seconds: float = setting(3600.0, "a retraining run still going after this is stopped",
                                             **POSITIVE)


@dataclass(frozen=True)
class IngestSettings:
    """Ingest: what a summary message may be, and how they are stored (docs/fleet.md, "Ingest")."""

    max_payload_bytes: int = setting(256 * 1024, "largest summary message on the wire", lo=1)
    max_clock_skew_seconds: float = setting(300.0, "a window ending later than now + this is refused", lo=0.0)
    max_window_seconds: float = setting(86400.0, "longest window accepted", **POSITIVE)
    max_inferences_per_second: float = setting(100000.0, "a window's n may be at most its length (at least 1 s) "
                                               "x this", **POSITIVE)
    batch_size: int = setting(256, "messages per storage transaction (one fsync each)", lo=1)
    offline_after_seconds: float = setting(180.0, "a device not heard from for this long is shown offline",
                                           **POSITIVE)


@dataclass(frozen=True)
class BundleSettings:
    """Bundles: which ones may give a model its reference histograms (docs/security.md)."""

    pubkey: str | None = setting(None, "Ed25519 public key (PEM) that bundles from `--bundle`/`--bundles` must be "
                                 "signed by; any other is skipped, logged and counted "
                                 "(`edgekit_fleet_bundles_rejected_total`). A relative path is relative to "
                                 "this file; `--pubkey` overrides it. Not set: bundles are trusted by their "
                                 "hashes alone")


@dataclass(frozen=True)
class CaptureSettings:
    """Field captures the devices upload (docs/captures.md)."""

    request_on_alert: int = setting(0, "when an alert is approved, ask every device it names for this many more "
                                    "captured samples (a retained capture request); 0 = off", lo=0, hi=100000)
    max_batch_bytes: int = setting(4 * 1024 * 1024, "largest capture upload or label update body a device may "
                                   "send (HTTP 413 beyond); other routes keep their own limit", lo=64 * 1024)


@dataclass(frozen=True)
class FleetSettings:
    drift: DriftSettings = subsection(DriftSettings)
    concept: ConceptSettings = subsection(ConceptSettings)
    alerts: AlertSettings = subsection(AlertSettings)
    ingest: IngestSettings = subsection(IngestSettings)
    bundles: BundleSettings = subsection(BundleSettings)
    captures: CaptureSettings = subsection(CaptureSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "drift": DriftSettings,
    "concept": ConceptSettings,
    "alerts": AlertSettings,
    "ingest": IngestSettings,
    "bundles": BundleSettings,
    "captures": CaptureSettings,
}


def load_settings(path: str | Path | None) -> FleetSettings:
    """Defaults when `path` is None; otherwise read and validate the TOML file (ConfigError, exit 2)."""
    if path is None:
        return FleetSettings()
    settings = parse_settings(read_toml(path, "fleet config"))
    pubkey = settings.bundles.pubkey
    if pubkey and not Path(pubkey).is_absolute():  # relative to the config file, as the agent's paths are
        settings = dataclasses.replace(settings, bundles=BundleSettings(pubkey=str(Path(path).parent / pubkey)))
    return settings


def parse_settings(raw: dict[str, Any]) -> FleetSettings:
    check_sections(raw, SECTIONS)
    sections = {name: cls(**section_values(name, cls, raw.get(name, {}), _typed)) for name, cls in SECTIONS.items()}
    settings = FleetSettings(**sections)
    check_rules(settings, SECTIONS)
    return settings


def _typed(key: str, value: Any, spec: str) -> Any:
    if spec == "list[str]" and isinstance(value, str):
        return shlex.split(value)  # a shell-style command string is split like a shell would
    return check_value(key, value, spec)


FLEET_DOC_INTRO = """\
<!-- Generated from edge_kit/fleet/settings.py by `make docs`: do not edit. -->

The fleet config is one TOML file, passed as `edge-kit fleet serve --config fleet.toml`. Sections and keys
left out take the defaults below. An unknown section or key, a value of the wrong type or outside what is
allowed is an error naming the dotted key (exit code 2), never ignored. What the tests and alerts do with
these values: [fleet](fleet.md). The other configs: [project](config.md), [agent](config-agent.md)."""


PAGE = ConfigPage("Fleet config reference", FLEET_DOC_INTRO, SECTIONS)

if __name__ == "__main__":
    raise SystemExit(PAGE.main("python -m edge_kit.fleet.settings"))
