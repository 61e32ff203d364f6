"""The deployment message: what the fleet publishes (retained) on `edgekit/<fleet>/<device>/deployment`.

One definition for both sides: the fleet server builds payloads with `encode_deployment_message`, the
agent reads them with `parse_deployment_message`. The message is only a pointer (a URL plus the
bundle file's sha256, size, name and version): the agent trusts nothing in it until the downloaded
file hashes to `sha256` and the bundle's own signature verifies against the agent's public key. So a
forged message can at most make a device install a genuine signed upgrade, or return to a genuine
bundle it verified and served before (`rollback` only ever picks a bundle the agent kept).

An empty retained payload clears the topic; callers test `not payload` before parsing.

The agent reports what it did with the last message in the `deployment` block of its status
(`DeploymentReport`), with one of the `STEPS`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from device_agent.errors import PayloadError

SCHEMA = "edgekit.deployment/1"
INSTALL, ROLLBACK = "install", "rollback"
ACTIONS = (INSTALL, ROLLBACK)

DOWNLOADING, VERIFYING, INSTALLED = "downloading", "verifying", "installed"
FAILED, ROLLED_BACK = "failed", "rolled_back"
STEPS = (DOWNLOADING, VERIFYING, INSTALLED, FAILED, ROLLED_BACK)
FINAL_STEPS = (INSTALLED, FAILED, ROLLED_BACK)

MAX_MESSAGE_BYTES = 8 * 1024  # a message is ~400 bytes; anything near this is not one
MAX_URL_CHARS = 2048
MAX_BUNDLE_SIZE = 1 << 40  # a sanity bound only; the agent applies its own, much smaller, cap
MAX_REASON_CHARS = 500
# Name and version become the file name `<name>-<version>.edgebundle`: no separators, no dot-dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("schema", "deployment", "action", "name", "version", "sha256", "size", "url", "issued_at")
# A rollback names a bundle the device already holds, so it needs no URL or size.
_OPTIONAL_FOR_ROLLBACK = ("size", "url")


@dataclass(frozen=True)
class DeploymentMessage:
    """A validated deployment message. `size`/`url` are None only for a rollback that omits them."""

    deployment: str
    action: str
    name: str
    version: str
    sha256: str
    size: int | None
    url: str | None
    issued_at: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA, "deployment": self.deployment, "action": self.action,
                               "name": self.name, "version": self.version, "sha256": self.sha256}
        if self.size is not None:
            out["size"] = self.size
        if self.url is not None:
            out["url"] = self.url
        out["issued_at"] = self.issued_at
        return out


def encode_deployment_message(message: DeploymentMessage) -> bytes:
    """The payload bytes to publish; validated by the same parser the agent uses, so the fleet cannot
    publish what every agent would ignore."""
    data = json.dumps(message.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    parse_deployment_message(data)
    return data


def parse_deployment_message(data: bytes) -> DeploymentMessage:
    """Validate a payload strictly; PayloadError(kind, reason) otherwise, `kind` for the agent's counters.

    Unknown fields are refused: a message of a newer schema must say so in `schema`, not be half-read.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise PayloadError("too_large", f"deployment message is {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("not_json", f"deployment message is not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise PayloadError("bad_field", "deployment message must be a JSON object")
    if obj.get("schema") != SCHEMA:
        raise PayloadError("schema", f"deployment message schema is {obj.get('schema')!r}, expected {SCHEMA!r}")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise PayloadError("bad_field", f"deployment message has unknown field(s) {unknown}")
    action = obj.get("action")
    if action not in ACTIONS:
        raise PayloadError("bad_field", f"'action' must be one of {list(ACTIONS)}, got {action!r}")
    optional = _OPTIONAL_FOR_ROLLBACK if action == ROLLBACK else ()
    missing = [f for f in _FIELDS if f not in obj and f not in optional]
    if missing:
        raise PayloadError("bad_field", f"deployment message lacks {missing}")
    return DeploymentMessage(
        deployment=_matching(obj, "deployment", _ID),
        action=str(action),
        name=_matching(obj, "name", _NAME),
        version=_matching(obj, "version", _NAME),
        sha256=_matching(obj, "sha256", _SHA256),
        size=_size(obj["size"]) if "size" in obj else None,
        url=_url(obj["url"]) if "url" in obj else None,
        issued_at=_timestamp(obj["issued_at"]),
    )


def _matching(obj: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = obj[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise PayloadError("bad_field", f"'{key}' must match {pattern.pattern}, got {value!r:.80}")
    return value


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_BUNDLE_SIZE:
        raise PayloadError("bad_field", f"'size' must be a positive integer of bytes, got {value!r:.40}")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS or any(c.isspace() or ord(c) < 32 for c in value):
        raise PayloadError("bad_field", "'url' must be a string without whitespace, at most "
                                        f"{MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a bad port
    except ValueError as exc:
        raise PayloadError("bad_field", f"'url' {value!r:.80} does not parse: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PayloadError("bad_field", f"'url' must be an absolute http:// or https:// URL, got {value!r:.80}")
    if parts.username is not None or parts.password is not None:
        raise PayloadError("bad_field", "'url' must not carry credentials (the message is retained, readable)")
    return value


def _timestamp(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise PayloadError("bad_field", f"'issued_at' must be unix seconds, got {value!r:.40}")
    return float(value)


@dataclass(frozen=True)
class DeploymentReport:
    """The `deployment` block of the agent's status: the last deployment it acted on and how far it got."""

    deployment: str
    version: str
    sha256: str
    step: str
    reason: str | None
    bytes: int
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "version": self.version, "sha256": self.sha256, "step": self.step,
                "reason": self.reason, "bytes": self.bytes, "at": self.at}


def parse_deployment_report(obj: Any) -> DeploymentReport:
    """The fleet's reader of a status document's `deployment` block; PayloadError when malformed."""
    if not isinstance(obj, dict):
        raise PayloadError("bad_field", "status 'deployment' must be an object")
    step = obj.get("step")
    if step not in STEPS:
        raise PayloadError("bad_field", f"status deployment 'step' must be one of {list(STEPS)}, got {step!r:.40}")
    reason = obj.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise PayloadError("bad_field", "status deployment 'reason' must be a string or null")
    count = obj.get("bytes", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise PayloadError("bad_field", "status deployment 'bytes' must be a non-negative integer")
    return DeploymentReport(
        deployment=_matching(obj, "deployment", _ID), version=_matching(obj, "version", _NAME),
        sha256=_matching(obj, "sha256", _SHA256), step=str(step),
        reason=None if reason is None else reason[:MAX_REASON_CHARS], bytes=count,
        at=_timestamp(obj.get("at", 0)))
