"""Device upload tokens: a device's credential for the fleet's device routes when it has no client certificate.

A token is HMAC-SHA256(fleet device key, device id), so the fleet stores no per-device secret: it recomputes the
token for the device a request names and compares in constant time. A device knows only its own token, so it can
upload only as itself. `edge-kit fleet enroll` writes the token beside the device's certificate; `fleet serve
--device-key-file` names the key. Over plain HTTP the token travels in clear: use TLS beyond a lab.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from device_agent.atomic import atomic_write_bytes
from edge_kit.errors import UsageError

KEY_BYTES = 32
_DOMAIN = b"edgekit-device-token/1:"  # keeps these MACs apart from any other use of the key


def device_token(key: bytes, device: str) -> str:
    """The upload token of `device` under the fleet's device key (64 hex digits)."""
    return hmac.new(key, _DOMAIN + device.encode("utf-8"), hashlib.sha256).hexdigest()


def token_matches(key: bytes, device: str, token: str) -> bool:
    """Whether `token` is `device`'s token (constant time in the token)."""
    return hmac.compare_digest(device_token(key, device).encode(), token.strip().encode("ascii", "replace"))


def load_device_key(path: str | Path) -> bytes:
    """The device key file's bytes (at least 32); UsageError (exit 2) when missing or too short."""
    p = Path(path)
    try:
        key = p.read_bytes().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the device key {p}: {exc.strerror or exc}") from exc
    if len(key) < KEY_BYTES:
        raise UsageError(f"device key {p} is shorter than {KEY_BYTES} bytes: make one with `fleet enroll`")
    return key


def create_device_key(path: Path) -> bytes:
    """A new random device key written to `path` (0600) unless one is there; the key."""
    if path.exists():
        return load_device_key(path)
    key = secrets.token_hex(KEY_BYTES).encode()
    atomic_write_bytes(path, key, mode=0o600)
    return key
