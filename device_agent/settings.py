"""`edge-agent run` settings: a TOML file (`--config`), overridden by command-line flags.

Strict like the project config: an unknown key, a wrong type or a value outside what is allowed is
exit 2 naming the dotted key. Relative paths are relative to the config file. Each key is declared
once, with its default, description and rule, by `setting` (`device_agent.settings_schema`);
docs/config-agent.md is generated from these declarations (`make docs`), and `deploy/agent.toml` is
the example a device installs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from device_agent.capture.config import CaptureSettings
from device_agent.deploy.config import DeploySettings
from device_agent.errors import ConfigError
from device_agent.http.protocol import HttpLimits
from device_agent.settings_schema import (
    POSITIVE,
    THREADS_DOC,
    ConfigPage,
    check_given,
    check_section,
    setting,
    subsection,
    subsections_of,
)
from device_agent.strict_toml import check_sections, check_value, read_toml, section_values
from device_agent.uplink.wire import BrokerConfig, parse_broker_url, topic_level_problem

_LIMITS = HttpLimits()  # the HTTP server's own defaults are the [http] defaults


@dataclass(frozen=True)
class MqttSettings:
    """The MQTT 5 broker the summaries go to; `mqtts://` or a `ca_certs` turns TLS on."""

    broker: str | None = setting(None, "`mqtt://HOST:PORT`, or `mqtts://` for TLS (required here or as --broker)")
    username: str | None = setting(None, "user name at the broker")
    password: str | None = setting(None, "password at the broker (prefer `password_file`)")
    password_file: Path | None = setting(None, "file holding the password (read at start)")
    ca_certs: Path | None = setting(None, "CA (PEM) the broker certificate chains to (file must exist)")
    certfile: Path | None = setting(None, "client certificate (PEM), if the broker wants one (file must exist)")
    keyfile: Path | None = setting(None, "the client certificate's private key (PEM) (file must exist)")
    tls_insecure: bool = setting(False, "skip the broker certificate check (testing only)")
    keepalive: int = setting(30, "seconds between MQTT keep-alive pings; 0 = none", lo=0)
    session_expiry: int = setting(7 * 24 * 3600, "seconds the broker keeps this device's session while it is "
                                  "offline", lo=0)
    reconnect_min: float = setting(0.5, "shortest wait before reconnecting (seconds; backoff with jitter)",
                                   **POSITIVE)
    reconnect_max: float = setting(60.0, "longest wait before reconnecting (seconds)", **POSITIVE)
    compress: bool = setting(True, "send summaries as zlib JSON (content type `application/json+zlib`)")


@dataclass(frozen=True)
class HttpSettings:
    """Limits of the local HTTP API (docs/agent.md, "HTTP API"); the --http-* flags override them."""

    max_body_bytes: int = setting(_LIMITS.max_body_bytes, "largest request body; a larger Content-Length gets "
                                  "413 before the body is read", lo=1)
    max_samples: int = setting(_LIMITS.max_samples, "samples in one request, labels in one call", lo=1)
    max_connections: int = setting(_LIMITS.max_connections, "open connections; one more closes the longest-idle "
                                   "one", lo=1)
    timeout: float = setting(_LIMITS.request_timeout, "seconds to send one whole request, or to stay idle "
                             "between requests", **POSITIVE)
    request_memory_bytes: int = setting(_LIMITS.request_memory_bytes, "predictions kept for labels that name a "
                                        "request id (bytes)", lo=0)

    def limits(self) -> HttpLimits:
        return HttpLimits(max_body_bytes=self.max_body_bytes, max_samples=self.max_samples,
                          max_connections=self.max_connections, request_timeout=self.timeout,
                          request_memory_bytes=self.request_memory_bytes)


@dataclass(frozen=True)
class AgentSettings:
    """The device: which bundles it serves, who it is, where it keeps what the broker has not acknowledged."""

    bundle: Path | None = setting(None, "a bundle file, or a folder whose newest verified `*.edgebundle` is served "
                                  "and watched (required here or as --bundle)")
    device_id: str | None = setting(None, "this device's id, an MQTT topic level: no `/`, `+` or `#` (required "
                                    "here or as --device-id)")
    fleet: str = setting("default", "fleet name, an MQTT topic level")
    spool: Path | None = setting(None, "SQLite spool of closed windows not yet acknowledged; unset = "
                                 "`$STATE_DIRECTORY/spool.db`, else `./edge-agent-spool.db`")
    spool_max_windows: int = setting(10_000, "windows the spool holds; when full the oldest are dropped "
                                     "(counted in status)", lo=1)
    http: str | None = setting(None, "`HOST:PORT` of the local HTTP API; unset = no HTTP API")
    window_seconds: float = setting(60.0, "length of a summary window (seconds)", **POSITIVE)
    pubkey: Path | None = setting(None, "Ed25519 public key (PEM) bundles must be signed by")
    require_signature: bool = setting(False, "refuse unsigned bundles (needs `pubkey`)")
    allow_downgrade: bool = setting(False, "accept an older version of the same model (a rollback)")
    model_name: str | None = setting(None, "the one model this device serves; a bundle of another name is "
                                     "refused; unset = the first bundle served pins it")
    watch_interval: float = setting(2.0, "seconds between checks of the bundle path", **POSITIVE)
    threads: int = setting(1, f"ONNX Runtime intra-op threads; {THREADS_DOC}", lo=0)
    mqtt: MqttSettings = subsection(MqttSettings)
    http_limits: HttpLimits = subsection(HttpLimits)
    deploy: DeploySettings = subsection(DeploySettings)
    capture: CaptureSettings = subsection(CaptureSettings)

    def spool_path(self) -> Path:
        if self.spool is not None:
            return self.spool
        # systemd's StateDirectory= sets this; elsewhere the spool lives next to where we run.
        state = os.environ.get("STATE_DIRECTORY")
        return Path(state.split(":")[0]) / "spool.db" if state else Path("edge-agent-spool.db")

    def broker_config(self) -> BrokerConfig:
        m = self.mqtt
        if not m.broker:
            raise ConfigError("mqtt.broker", "required: pass --broker mqtt://HOST:PORT or set it in the config")
        password = m.password
        if m.password_file is not None:
            try:
                password = m.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError("mqtt.password_file", f"cannot read {m.password_file}: {exc}") from exc
        options: dict[str, Any] = {
            "ca_certs": _str(m.ca_certs), "certfile": _str(m.certfile), "keyfile": _str(m.keyfile),
            "insecure": m.tls_insecure, "keepalive": m.keepalive, "session_expiry": m.session_expiry,
            "reconnect_min": m.reconnect_min, "reconnect_max": m.reconnect_max,
        }
        if m.username:
            options.update(username=m.username, password=password)
        for key in ("ca_certs", "certfile", "keyfile"):
            if options[key] is not None and not Path(options[key]).is_file():
                raise ConfigError(f"mqtt.{key}", f"file not found: {options[key]}")
        return parse_broker_url(m.broker, what="mqtt.broker", **options)


# The sections of agent.toml, in the order the docs show them. A new section is a dataclass of
# `setting`s, an entry here, and a `subsection` field of the same name in AgentSettings.
SECTIONS: dict[str, type] = {"agent": AgentSettings, "mqtt": MqttSettings, "http": HttpSettings,
                             "deploy": DeploySettings, "capture": CaptureSettings}


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _coerce(dotted: str, value: Any, annotation: str, base: Path) -> Any:
    """Type-check one value; a `Path` key becomes a path, relative ones relative to the config file."""
    if annotation.replace(" ", "").removesuffix("|None") == "Path":
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(dotted, "must be a non-empty path string (without NUL)")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    return check_value(dotted, value, annotation)


def _read_section(name: str, data: dict[str, Any], base: Path) -> Any:
    cls = SECTIONS[name]
    values = section_values(name, cls, data.get(name, {}), lambda key, value, ann: _coerce(key, value, ann, base),
                            skip=subsections_of(cls))
    section = cls(**values)
    check_section(name, section, None)
    return section


def load_settings(path: str | Path | None) -> AgentSettings:
    """Settings from a TOML file (or the defaults when `path` is None).

    [agent] holds the device's own keys; every other section becomes the `AgentSettings` field of the
    same name ([http] as `http_limits`, the server's form of it).
    """
    if path is None:
        return AgentSettings()
    data = read_toml(path)
    check_sections(data, SECTIONS)
    base = Path(path).resolve().parent
    sections = {name: _read_section(name, data, base) for name in SECTIONS}
    agent: AgentSettings = sections.pop("agent")
    http = sections.pop("http")
    return replace(agent, http_limits=http.limits(), **sections)


# --http-* flag -> (the [http] key whose rule it follows, the HttpLimits field it sets)
_HTTP_FLAGS = {"max_body_bytes": "max_body_bytes", "max_samples": "max_samples",
               "max_connections": "max_connections", "timeout": "request_timeout"}


def apply_flags(settings: AgentSettings, args: argparse.Namespace) -> AgentSettings:
    """Flags given on the command line win over the config file; they follow the same rules as its keys."""
    agent: dict[str, Any] = {}
    for flag, key in (("bundle", "bundle"), ("spool", "spool"), ("pubkey", "pubkey")):
        if getattr(args, flag, None):
            agent[key] = Path(getattr(args, flag))
    for flag in ("device_id", "fleet", "http", "model_name"):
        if getattr(args, flag, None):
            agent[flag] = getattr(args, flag)
    if getattr(args, "window_seconds", None) is not None:
        check_given(AgentSettings, "window_seconds", "--window-seconds", args.window_seconds)
        agent["window_seconds"] = float(args.window_seconds)
    if getattr(args, "allow_downgrade", False):
        agent["allow_downgrade"] = True
    mqtt = replace(settings.mqtt, broker=args.broker) if getattr(args, "broker", None) else settings.mqtt
    limits: dict[str, Any] = {}
    for key, field_name in _HTTP_FLAGS.items():
        value = getattr(args, f"http_{key}", None)
        if value is not None:
            check_given(HttpSettings, key, f"--http-{key}", value)
            limits[field_name] = value
    merged = replace(settings, **agent, mqtt=mqtt, http_limits=replace(settings.http_limits, **limits))
    if merged.bundle is None:
        raise ConfigError("agent.bundle", "required: pass --bundle PATH or set it in the config")
    if merged.require_signature and merged.pubkey is None:
        # Without a key there is nothing to check a signature against: a signed-looking bundle from
        # anyone would pass. Refuse the configuration instead of pretending.
        raise ConfigError("agent.require_signature", "is true but no public key is set",
                          hint="set agent.pubkey or pass --pubkey PUB.pem")
    if not merged.device_id:
        raise ConfigError("agent.device_id", "required: pass --device-id ID or set it in the config")
    for key, value in (("device_id", merged.device_id), ("fleet", merged.fleet)):
        problem = topic_level_problem(value)
        if problem is not None:
            raise ConfigError(f"agent.{key}", problem)
    return merged


AGENT_DOC_INTRO = """\
<!-- Generated from device_agent/settings.py by `make docs`: do not edit. -->

The agent config is one TOML file, passed as `edge-agent run --config agent.toml`; `deploy/agent.toml` is
the example a device installs. Flags given to `edge-agent run` override the file and follow the same
rules: `--bundle`, `--broker`, `--device-id`, `--fleet`, `--spool`, `--http`, `--window-seconds`, `--pubkey`,
`--allow-downgrade`, `--model-name` and the `--http-*` limits. Sections and keys left out take the defaults
below; relative paths are relative to the config file. An unknown section or key, a value of the wrong
type or outside what is allowed is an error naming the dotted key (exit code 2), never ignored. What the
agent does with these values: [agent](agent.md). The other configs: [project](config.md),
[fleet](config-fleet.md)."""


PAGE = ConfigPage("Agent config reference", AGENT_DOC_INTRO, SECTIONS)

if __name__ == "__main__":
    raise SystemExit(PAGE.main("python -m device_agent.settings"))
