"""Facts that cross the wire, defined once for the agent and the fleet server (docs/architecture.md section 6).

- MQTT topic names: `edgekit/<fleet>/<device>/summary`, `.../status`, `.../deployment` (the
  retained pointer to a bundle the fleet wants the device to serve) and `.../capture` (the fleet's
  retained request for more captured samples, docs/captures.md), the shared-subscription
  form the fleet consumers use, and the reverse (topic -> fleet, device, kind).
- Broker URLs: `mqtt[s]://[USER[:PASSWORD]@]HOST[:PORT]` plus the TLS and session options, parsed
  into one `BrokerConfig` that both the agent's publisher and the fleet's consumer connect with.
- `HOST:PORT` listen addresses for both HTTP servers.

Both sides import this module; `device_agent` may not import `edge_kit`, so it lives here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from device_agent.errors import ConfigError, UsageError

TOPIC_ROOT = "edgekit"
SUMMARY = "summary"
STATUS = "status"
DEPLOYMENT = "deployment"  # fleet -> device, retained; the payload is deploy.message's
CAPTURE = "capture"  # fleet -> device, retained; an edgekit.capture_request/1 message
KINDS = (SUMMARY, STATUS, DEPLOYMENT, CAPTURE)
# A password in the broker URL shows in `ps`; this variable is read instead when the URL has none.
PASSWORD_ENV = "EDGEKIT_MQTT_PASSWORD"
MQTT_PORT, MQTTS_PORT = 1883, 8883


def topic(fleet: str, device: str, kind: str) -> str:
    """`edgekit/<fleet>/<device>/<kind>`; `device` may be the `+` wildcard in subscriptions."""
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{TOPIC_ROOT}/{fleet}/{device}/{kind}"


def summary_topic(fleet: str, device: str = "+") -> str:
    return topic(fleet, device, SUMMARY)


def status_topic(fleet: str, device: str = "+") -> str:
    return topic(fleet, device, STATUS)


def deployment_topic(fleet: str, device: str = "+") -> str:
    return topic(fleet, device, DEPLOYMENT)


def capture_topic(fleet: str, device: str = "+") -> str:
    return topic(fleet, device, CAPTURE)


def shared_topic(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: the broker spreads matching messages over the group's members."""
    return f"$share/{group}/{topic_filter}"


def parse_topic(name: str) -> tuple[str, str, str] | None:
    """(fleet, device, kind) of a concrete edgekit topic, or None when it is not one."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[3] not in KINDS or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2], parts[3]


def topic_level_problem(value: str) -> str | None:
    """Why `value` cannot be one MQTT topic level (a fleet or device id), or None when it can."""
    if not value.strip():
        return "must not be empty"
    if any(c in value for c in "/+#\x00"):
        return f"{value!r} cannot be an MQTT topic level (no '/', '+', '#')"
    return None


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect. `tls` is on for mqtts:// or when a CA file is given."""

    host: str
    port: int
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_broker_url(url: str, *, what: str = "--broker", **options: Any) -> BrokerConfig:
    """`mqtt[s]://[USER[:PASSWORD]@]HOST[:PORT]` plus keyword options of `BrokerConfig`.

    A username in the URL is used unless `username` is given; its password comes from the URL,
    else from $EDGEKIT_MQTT_PASSWORD. A CA file turns TLS on even for mqtt://. `what` names the
    flag (UsageError) or config key (ConfigError) in the message; both exit 2.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise _bad(what, f"{url!r} is not mqtt://HOST:PORT or mqtts://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad(what, f"{url!r} has a path or query; expected mqtt://HOST:PORT")
    tls = parts.scheme in ("mqtts", "ssl") or bool(options.get("ca_certs"))
    try:
        port = parts.port or (MQTTS_PORT if tls else MQTT_PORT)
    except ValueError as exc:
        raise _bad(what, f"bad port in {url!r}") from exc
    unknown = set(options) - set(BrokerConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown broker options: {sorted(unknown)}")
    if parts.username and not options.get("username"):
        options["username"] = unquote(parts.username)
        password = unquote(parts.password) if parts.password is not None else os.environ.get(PASSWORD_ENV)
        options["password"] = password
    config = BrokerConfig(host=parts.hostname, port=port, tls=tls)
    return replace(config, **options)


def _bad(what: str, message: str) -> UsageError:
    """A flag (`--broker`) gets a usage error naming it; a config key gets a ConfigError naming the key."""
    return UsageError(f"{what}: {message}") if what.startswith("-") else ConfigError(what, message)


def parse_host_port(spec: str, *, what: str = "--http", default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` (default host, loopback) or `[v6]:PORT` -> (host, port); UsageError otherwise."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{what} {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:8081")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{what} {spec!r}: write an IPv6 address in brackets, e.g. [::1]:8081")
    return host or default_host, int(port)
