"""`edge-agent run` settings: a TOML file (`--config`), overridden by command-line flags.

    [agent]                                  [mqtt]
    bundle = "/var/lib/edge-agent/bundles"   broker = "mqtts://broker.example:8883"
    device_id = "cam-7"                      username = "cam-7"
    fleet = "default"                        password_file = "/etc/edge-agent/mqtt-password"
    spool = "/var/lib/edge-agent/spool.db"   ca_certs = "/etc/edge-agent/ca.pem"
    http = "127.0.0.1:8081"                  certfile = "..."   keyfile = "..."
    window_seconds = 60                      keepalive = 30
    pubkey = "/etc/edge-agent/edgekit.pub"   session_expiry = 604800
    require_signature = true                 reconnect_min = 0.5
    spool_max_windows = 10000                reconnect_max = 60
    watch_interval = 2.0                     compress = true
    threads = 0
    allow_downgrade = false   # true: accept an older version of the same model (a rollback)
    model_name = "digits"     # the one model this device serves; unset: the first bundle served pins it

    [http]                                   # limits of the local HTTP API (--http-* flags)
    max_body_bytes = 8388608                 # 8 MiB; a bigger Content-Length gets 413 unread
    max_samples = 4096                       # samples in one request (and labels in one call)
    max_connections = 64                     # one more closes the longest-idle connection
    timeout = 10.0                           # seconds to send one request, or to sit idle
    request_memory_bytes = 1048576           # predictions kept for labels naming a request id

Strict like the project config: an unknown key or a wrong type is exit 2 naming the dotted key.
Relative paths are relative to the config file.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError
from device_agent.http.protocol import HttpLimits
from device_agent.strict_toml import check_sections, check_value, read_toml, section_values
from device_agent.uplink.wire import BrokerConfig, parse_broker_url, topic_level_problem


@dataclass(frozen=True)
class MqttSettings:
    broker: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0
    compress: bool = True


@dataclass(frozen=True)
class AgentSettings:
    bundle: Path | None = None
    device_id: str | None = None
    fleet: str = "default"
    spool: Path | None = None
    spool_max_windows: int = 10_000
    http: str | None = None
    window_seconds: float = 60.0
    pubkey: Path | None = None
    require_signature: bool = False
    allow_downgrade: bool = False
    model_name: str | None = None
    watch_interval: float = 2.0
    threads: int = 0
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    http_limits: HttpLimits = field(default_factory=HttpLimits)

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


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


_PATH_KEYS = {"bundle", "spool", "pubkey", "password_file", "ca_certs", "certfile", "keyfile"}


def _coerce(dotted: str, value: Any, annotation: str, base: Path) -> Any:
    key = dotted.rsplit(".", 1)[-1]
    if key in _PATH_KEYS:
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(dotted, "must be a non-empty path string (without NUL)")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    checked = check_value(dotted, value, annotation.removesuffix(" | None"))
    # Every number the agent takes is a count, a size or a duration.
    if annotation.startswith("int") and checked < 0:
        raise ConfigError(dotted, f"must be a non-negative integer, got {value!r}")
    if annotation.startswith("float") and checked <= 0:
        raise ConfigError(dotted, f"must be a positive number, got {value!r}")
    return checked


def _section(cls: type[Any], name: str, data: Any, base: Path) -> dict[str, Any]:
    return section_values(name, cls, data, lambda key, value, ann: _coerce(key, value, ann, base),
                          skip=("mqtt", "http_limits"))


def load_settings(path: str | Path | None) -> AgentSettings:
    """Settings from a TOML file (or the defaults when `path` is None)."""
    if path is None:
        return AgentSettings()
    data = read_toml(path)
    check_sections(data, ("agent", "mqtt", "http"))
    base = Path(path).resolve().parent
    agent = _section(AgentSettings, "agent", data.get("agent", {}), base)
    mqtt = _section(MqttSettings, "mqtt", data.get("mqtt", {}), base)
    http = _section(HttpLimits, "http", data.get("http", {}), base)
    _check_http(http, "http.")
    return AgentSettings(**agent, mqtt=MqttSettings(**mqtt), http_limits=HttpLimits(**http))


def _check_http(values: dict[str, Any], prefix: str) -> None:
    # Zero would make the API useless (every request refused), so these must be positive.
    for key in ("max_body_bytes", "max_samples", "max_connections"):
        if key in values and values[key] < 1:
            raise ConfigError(f"{prefix}{key}", f"must be a positive integer, got {values[key]!r}")


def apply_flags(settings: AgentSettings, args: argparse.Namespace) -> AgentSettings:
    """Flags given on the command line win over the config file."""
    agent: dict[str, Any] = {}
    for flag, key in (("bundle", "bundle"), ("spool", "spool"), ("pubkey", "pubkey")):
        if getattr(args, flag, None):
            agent[key] = Path(getattr(args, flag))
    for flag in ("device_id", "fleet", "http", "model_name"):
        if getattr(args, flag, None):
            agent[flag] = getattr(args, flag)
    if getattr(args, "window_seconds", None) is not None:
        if args.window_seconds <= 0:
            raise ConfigError("window_seconds", "must be a positive number of seconds")
        agent["window_seconds"] = float(args.window_seconds)
    if getattr(args, "allow_downgrade", False):
        agent["allow_downgrade"] = True
    mqtt = replace(settings.mqtt, broker=args.broker) if getattr(args, "broker", None) else settings.mqtt
    http = {key: getattr(args, f"http_{key}") for key in ("max_body_bytes", "max_samples", "max_connections", "timeout")
            if getattr(args, f"http_{key}", None) is not None}
    _check_http(http, "--http-")
    if http.get("timeout", 1.0) <= 0:
        raise ConfigError("--http-timeout", f"must be a positive number of seconds, got {http['timeout']!r}")
    merged = replace(settings, **agent, mqtt=mqtt, http_limits=replace(settings.http_limits, **http))
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
