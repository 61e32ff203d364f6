"""uvicorn's h11 protocol with the two limits it lacks: a whole-request deadline and idle eviction.

uvicorn times out idle keep-alive connections only after a response; a connection that never sends
a request, or sends half of one (slowloris), is kept forever. Here every request must arrive in
full within `request_timeout` seconds of the connection opening (or of its first byte after a
keep-alive response). And when more than `max_connections` are open, the oldest connection that
is not running a request is closed to make room, so idle sockets cannot lock an operator or a
health probe out; only when every connection is busy does uvicorn's `limit_concurrency` answer 503.

uvicorn writes the headers and the body of an answer separately; TCP_NODELAY is set on every
connection here so those writes do not meet Nagle's algorithm and the client's delayed ACK (which
would hold every keep-alive answer ~40 ms). asyncio sets it only when the listening socket was made
with proto IPPROTO_TCP, which a socket bound beforehand by `socket.create_server` is not.

Over TLS, the client certificate the handshake verified (if the client sent one) is handed to the
app as `scope["extensions"]["tls"]["client_cert_cn"]` (its subject common name; None without a
certificate), so a route can tell which enrolled device is asking.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    request_timeout: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _with_peer_certificate(self.app, peer_common_name(ssl_object.getpeercert()))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened_at = time.monotonic()
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()
        open_now = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_now) > self.max_connections:
            self._evict_oldest_idle(open_now)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_incomplete():
            if self._deadline is None:
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # uvicorn's keep-alive timer takes over until the next request's first byte

    def _request_incomplete(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._request_incomplete():
            self.transport.close()

    def _evict_oldest_idle(self, open_now: list[Any]) -> None:
        # Connections being closed are left out: a burst of new ones must not all pick the same victim.
        idle: list[Any] = [c for c in open_now if c is not self and isinstance(c, DeadlineH11Protocol) and c._idle()]
        if idle:
            oldest = min(idle, key=lambda c: c.opened_at)
            oldest.transport.close()


def peer_common_name(cert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (`SSLObject.getpeercert()`); None when none was sent."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def _with_peer_certificate(app: ASGIApp, common_name: str | None) -> ASGIApp:
    """The app, with this connection's client certificate name added to every request's scope."""

    async def with_peer(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = {**extensions.get("tls", {}), "client_cert_cn": common_name}
        await app(scope, receive, send)

    return with_peer


def protocol_class(request_timeout: float, max_connections: int) -> type[DeadlineH11Protocol]:
    return type("FleetH11Protocol", (DeadlineH11Protocol,),
                {"request_timeout": request_timeout, "max_connections": max_connections})
