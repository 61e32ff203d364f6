"""Who may read and change the fleet server over HTTP: operator token, CSRF and DNS-rebinding checks.

One ASGI middleware in front of every route, so no endpoint can forget a check:

- Host must be a well-formed host (a name or address, an optional port; `[::1]attacker.example` is
  400) and an allowed one (loopback names, the address it listens on, `--allowed-host`): a page on
  another site that rebinds its DNS name to 127.0.0.1 reaches the server under that other name.
- A request head over 16 KiB, or one header line over 8 KiB, is 431 (uvicorn takes a head that
  arrives in one read whole, whatever its size).
- Origin, when a browser sends one, must be this server's own origin or an `--allowed-origin`.
- A state-changing request (any method but GET/HEAD) needs `Authorization: Bearer <token>` and
  `Content-Type: application/json`. A cross-site HTML form can send neither, so it cannot approve an
  alert (which runs the retraining command). No token configured: writes are refused outright.
- Reading the API and /metrics needs the token too, unless `open_reads` is set, and then only for
  clients on the loopback interface. The page itself, its static files and /healthz hold no data
  and are open, so an operator can load the page and type the token into it.
- Bundle downloads (`GET/HEAD /api/bundles/<sha256>`) take no operator token: devices have none. With
  `device_certs` (the listener is TLS with `--tls-client-ca`), they need the device's enrolled client
  certificate instead (none: 401); the device is the certificate's CN, and an `X-Edgekit-Device`
  naming another device is 403. Without it they are open to whoever reaches the server (bundles are
  signed, not secret) and the device header is taken on trust.
- Capture uploads and label updates (`POST /api/captures/upload`, `/api/captures/labels`) take a device
  credential, never the operator token: the verified client certificate's CN when `device_certs` (an
  `X-Edgekit-Device` naming another device is 403), else `X-Edgekit-Device: <id>` with
  `Authorization: Device <token>`, the token checked against `device_key` (`device_tokens`). Neither
  configured: 403; a missing or wrong credential: 401. The device is handed to the route in the scope
  (`DEVICE_SCOPE_KEY`). The capture export (`GET /api/captures`) needs the operator token even with
  `open_reads`: it holds the devices' real inputs.
- A body-carrying request must state a Content-Length (no chunked bodies), at most `max_body`
  bytes (`device_max_body` for the device routes, whose batches are larger); it is read in full
  before the route runs, and never more than stated.

The token is compared with `hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_kit.errors import UsageError
from edge_kit.fleet.device_tokens import token_matches

TOKEN_ENV = "EDGEKIT_FLEET_TOKEN"
MIN_TOKEN_CHARS = 16
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
OPEN_PATHS = frozenset({"/", "/index.html", "/healthz"})
# Static files, and bundle downloads: devices fetch those without the operator token (bundles are
# signed, not secret; the device verifies what it fetched against its own public key).
DEVICE_PREFIX = "/api/bundles/"
OPEN_PREFIXES = ("/static/", DEVICE_PREFIX)
DEVICE_HEADER = b"x-edgekit-device"
# Routes a device writes to with its own credential (docs/captures.md), and the key under which the
# authenticated device id reaches the route in the ASGI scope.
DEVICE_WRITE_PATHS = frozenset({"/api/captures/upload", "/api/captures/labels"})
DEVICE_SCOPE_KEY = "edgekit.device"
# Reads that need the operator token even with open_reads: the capture export holds real inputs.
TOKEN_ONLY_READS = frozenset({"/api/captures"})
DEVICE_MAX_BODY = 4 * 1024 * 1024
READ_METHODS = frozenset({"GET", "HEAD"})
MAX_HEADER_LINE = 8 * 1024  # one header line; more is 431
MAX_HEAD_BYTES = 16 * 1024  # request target and headers together (uvicorn's h11 limit for a head in pieces)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class HttpSecurity:
    token: str | None = None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    open_reads: bool = False  # GET of the API without the token, for loopback clients only
    max_body: int = 1024 * 1024
    device_certs: bool = False  # bundle downloads need a verified client certificate (TLS with a client CA)
    device_key: bytes | None = field(default=None, repr=False)  # --device-key-file: device upload tokens
    device_max_body: int = DEVICE_MAX_BODY  # body cap of the device routes (capture batches)

    def hosts(self) -> frozenset[str]:
        return LOOPBACK_HOSTS | {h.lower() for h in self.allowed_hosts}


def load_token(token_file: str | None, environ: MutableMapping[str, str] | None = None) -> str | None:
    """The operator token from `--token-file` (first line) or EDGEKIT_FLEET_TOKEN; None when neither."""
    env = os.environ if environ is None else environ
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token-file {token_file}: cannot read it: {exc}") from exc
        source = f"--token-file {token_file}"
    elif env.get(TOKEN_ENV):
        token, source = env[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise UsageError(f"{source}: the operator token must be at least {MIN_TOKEN_CHARS} printable ASCII "
                         "characters without spaces (make one: python -c 'import secrets; "
                         "print(secrets.token_urlsafe())')")
    return token


def certified_device(scope: Scope) -> str | None:
    """The device id the TLS handshake proved: the verified client certificate's CN, else None."""
    tls = scope.get("extensions", {}).get("tls") or {}
    name = tls.get("client_cert_cn")
    return name if isinstance(name, str) and name else None


def _header(scope: Scope, name: bytes) -> str | None:
    found = None
    for key, value in scope["headers"]:
        if key == name:
            if found is not None:  # a repeated security header is ambiguous: treat as absent/invalid
                return "\x00duplicate"
            found = value.decode("latin-1")
    return found


# RFC 9110 Host: a bracketed IPv6 literal or a name/IPv4 address, then an optional decimal port.
# Anything else (`[::1]attacker.example`, spaces, a userinfo `@`) is not a host name: 400.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{1,5})?")


def _host_name(host: str) -> str | None:
    """The host part of a Host header (lower case), or None when the header is not a valid host."""
    match = _HOST.fullmatch(host.strip().lower())
    return match.group(1) if match else None


def _is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def _head_too_long(scope: Scope) -> str | None:
    """Why the request head is over the limits (uvicorn parses a head that arrives in one read whole)."""
    total = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    for name, value in scope["headers"]:
        line = len(name) + len(value) + 4  # "name: value\r\n"
        if line > MAX_HEADER_LINE:
            return f"a header line is longer than {MAX_HEADER_LINE} bytes"
        total += line
    if total > MAX_HEAD_BYTES:
        return f"the request head is longer than {MAX_HEAD_BYTES} bytes"
    return None


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    """The checks above, then the route with the already-read body replayed to it."""

    def __init__(self, app: ASGIApp, security: HttpSecurity) -> None:
        self.app = app
        self.security = security
        self.hosts = security.hosts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.check(scope)
        if problem is not None:
            await _refuse(send, *problem)
            return
        if scope["method"] in READ_METHODS:
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def check(self, scope: Scope) -> tuple[int, str] | None:
        s = self.security
        too_long = _head_too_long(scope)
        if too_long is not None:
            return 431, too_long
        host = _header(scope, b"host")
        if host is None or _host_name(host) not in self.hosts:
            return 400, "Host not allowed: add it with --allowed-host (see docs/fleet.md, reverse proxy)"
        origin = _header(scope, b"origin")
        if origin is not None and not self._origin_ok(origin, host):
            return 403, "cross-origin request refused (Origin not allowed)"
        path, method = scope["path"], scope["method"]
        if path in DEVICE_WRITE_PATHS and method not in READ_METHODS:
            return self._uploading_device(scope)
        if method in READ_METHODS:
            if s.device_certs and path.startswith(DEVICE_PREFIX):
                return self._device(scope)
            if path in TOKEN_ONLY_READS:
                return self._authorised(scope)
            if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
                return None
            if s.open_reads and _is_loopback(scope):
                return None
            return self._authorised(scope)
        if s.token is None:
            return 403, "changes are disabled: no operator token configured (--token-file or EDGEKIT_FLEET_TOKEN)"
        refused = self._authorised(scope)
        if refused is not None:
            return refused
        content_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return 415, "state-changing requests need Content-Type: application/json"
        return None

    def _device(self, scope: Scope) -> tuple[int, str] | None:
        device = certified_device(scope)
        if device is None:
            return 401, "bundle downloads need this device's enrolled client certificate (TLS)"
        claimed = _header(scope, DEVICE_HEADER)
        if claimed is not None and claimed != device:
            return 403, "X-Edgekit-Device does not match the client certificate's device"
        return None

    def _uploading_device(self, scope: Scope) -> tuple[int, str] | None:
        """The device credential of a device route; sets the device in the scope when it holds."""
        s = self.security
        claimed = _header(scope, DEVICE_HEADER)
        device = certified_device(scope) if s.device_certs else None
        if device is not None:
            if claimed is not None and claimed != device:
                return 403, "X-Edgekit-Device does not match the client certificate's device"
        elif s.device_key is None:
            if s.device_certs:
                return 401, "capture uploads need this device's enrolled client certificate (TLS)"
            return 403, "capture uploads need device credentials"
        else:
            scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
            if claimed is None or claimed.startswith("\x00") or scheme.lower() != "device" or not token.strip():
                return 401, "capture uploads need X-Edgekit-Device and Authorization: Device <token>"
            if not token_matches(s.device_key, claimed, token):
                return 401, "wrong device token for this X-Edgekit-Device"
            device = claimed
        content_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return 415, "state-changing requests need Content-Type: application/json"
        scope[DEVICE_SCOPE_KEY] = device
        return None

    def _authorised(self, scope: Scope) -> tuple[int, str] | None:
        token = self.security.token
        if token is None:
            return 401, "no operator token configured: start with --token-file (or --open-reads to read)"
        scheme, _, value = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return 401, "missing or wrong operator token (Authorization: Bearer ...)"
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in {o.lower().rstrip("/") for o in self.security.allowed_origins}:
            return True
        scheme, sep, rest = origin.partition("://")
        # Same origin: the browser's page came from this very Host (which passed the allow-list).
        return bool(sep) and scheme in ("http", "https") and rest == host.strip().lower()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body within the cap, or None after answering 400/413."""
        if _header(scope, b"transfer-encoding") is not None:
            await _refuse(send, 400, "chunked bodies are not accepted: send Content-Length")
            return None
        declared = _header(scope, b"content-length")
        if declared is None or not declared.isdigit():  # the HTTP parser refuses -1 and non-numbers first
            await _refuse(send, 400, "a request with a body needs a valid Content-Length")
            return None
        length = int(declared)
        cap = self.security.device_max_body if scope["path"] in DEVICE_WRITE_PATHS else self.security.max_body
        if length > cap:
            await _refuse(send, 413, f"body over {cap} bytes")
            return None
        chunks: list[bytes] = []
        got = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            got += len(chunk)
            if got > length:  # the parser enforces Content-Length; this is the backstop
                await _refuse(send, 400, "body longer than its Content-Length")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
