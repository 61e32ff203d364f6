"""The agent's local HTTP server: its own /predict API and the Open Inference Protocol v2, one event loop.

Standard library only (asyncio), chosen by measurement (benchmarks/bench_agent.py, docs/agent.md)
over `ThreadingHTTPServer`, which makes one thread per connection, parses headers with the email
package and writes each response in several small writes (a 40 ms Nagle/delayed-ACK stall per
keep-alive request). Here one thread runs an asyncio loop; each response leaves in one write on a
TCP_NODELAY socket; small requests (the common case on a device) are answered inline on the loop,
and requests with a large body go to one worker thread (created once), so a big
batch never holds up `/healthz`.

Hostile clients are bounded (docs/security.md, "Agent HTTP"): the body limit is checked against
Content-Length before a byte of the body is read; a request must arrive whole within
`request_timeout` seconds and an idle keep-alive connection is closed after it; at most
`max_connections` are open, and one more evicts the longest-idle connection instead of being
refused, so a pile of idle sockets cannot lock out a health check.

Large bodies share one memory budget, counted in bytes that have ARRIVED, never in bytes a
Content-Length merely announces: a socket that declares 8 MiB and sends nothing holds nothing. A
connection whose next bytes would overflow the budget stops being read (TCP pushes back on its
client) until a body is answered; small bodies (answered inline) never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from device_agent.agent import Agent
from device_agent.http.protocol import CONTINUE, HttpError, HttpLimits, Request, Response, encode_response, parse_head
from device_agent.http.routes import Routes, error_response

log = logging.getLogger(__name__)

# Requests with bodies up to this size run inline on the event loop: a digits batch of 32 in JSON
# is ~10 KB and costs less than a hand-off to a thread would. Bigger ones go to the worker.
INLINE_BODY_BYTES = 64 * 1024
# One worker: a large request's memory (its JSON parsed into Python objects, ONNX Runtime's
# activations for thousands of samples) is then held once at a time: eight clients at the body limit
# peak about 25 MB above one client (bench_agent_body_budget.py); small requests go on meanwhile.
WORKERS = 1
# Large bodies being received or answered, all connections together, hold at most this many times the
# body limit: 64 connections each sending 8 MiB must not take a small device to 512 MB. One body
# limit is shared by every receiving connection; when no large request is being answered, the receiver
# that holds the most of its body may use the second, so partial bodies that fill the shared part can
# never deadlock (and a socket that announced a body and sent little of it never gets that turn).
BODY_BUDGET_FACTOR = 2


class _Connection(asyncio.Protocol):
    """One client connection: buffers bytes, cuts requests out of them, answers them in order."""

    def __init__(self, server: AgentHTTPServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.request: Request | None = None  # head parsed, body still arriving
        self.busy = False  # a request is being answered (by the worker)
        self.write_paused = False
        self.closing = False
        self.last_activity = time.monotonic()
        self.request_started: float | None = None  # first byte of the request being received
        self.reserved = 0  # bytes of the server's body budget held by the current request
        self.body: mmap.mmap | None = None  # a large body, written in place as its bytes arrive
        self.body_fill = 0
        self.body_since = 0.0  # when the large body's first bytes were taken (breaks ties for going first)
        self.waiting_since: float | None = None  # stopped reading: the body budget is full

    # -- asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Belt and braces with the one-write responses: nothing ever waits for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._connections.discard(self)
        self.server._receiving.discard(self)
        self.server._waiting.pop(self, None)
        if self.body is not None:
            self.body.close()
            self.body = None
        if not self.busy:  # the worker still holds a request being answered: _finish releases it
            self._release()

    def _release(self) -> None:
        if self.reserved:
            self.server._body_bytes -= self.reserved
            self.reserved = 0
            self.server._wake_waiting()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_activity = now
        if self.request_started is None:
            self.request_started = now
        self.buf += data
        if not self.busy and not self.write_paused:
            self._process()

    def pause_writing(self) -> None:  # the client does not read its answers: stop taking requests
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.busy and not self.closing:
            self.transport.resume_reading()
            self._process()

    # -- requests ----------------------------------------------------------------------------------

    def _process(self) -> None:
        limits = self.server.limits
        while not (self.busy or self.closing or self.write_paused):
            if self.request is None:
                if not self.buf:
                    self.request_started = None
                    return
                try:
                    parsed = parse_head(self.buf, limits.max_body_bytes)
                except HttpError as exc:
                    self.server.agent.count_bad_request()
                    self._reply(error_response(exc.status, str(exc)), keep_alive=False)
                    return
                if parsed is None:
                    return
                self.request, head_len = parsed
                del self.buf[:head_len]
                if self.request.expect_continue and len(self.buf) < self.request.content_length:
                    assert self.transport is not None
                    self.transport.write(CONTINUE)
            request = self.request
            n = request.content_length
            if n > INLINE_BODY_BYTES:
                # A large body goes into an anonymous memory map of its exact size: the kernel backs
                # its pages only as bytes are written (nothing for bytes announced and not sent), and
                # unmaps it whole when the request is done, so no freed body is left in the heap.
                if self.body is None:
                    self.body, self.body_fill = mmap.mmap(-1, n), 0
                take = min(n - self.body_fill, len(self.buf))
                if take:
                    if not self.server._take_budget(self, take):
                        self._wait_for_budget()
                        return
                    self.body[self.body_fill : self.body_fill + take] = self.buf[:take]
                    del self.buf[:take]
                    self.body_fill += take
                if self.body_fill < n:
                    return
                request.body, self.body = memoryview(self.body), None
                self.server._receiving.discard(self)
                self.server._answering += 1
            else:
                if len(self.buf) < n:
                    return
                request.body = bytes(self.buf[:n]) if n else b""
                del self.buf[:n]
            self.request = None
            self._dispatch(request)

    def _dispatch(self, request: Request) -> None:
        if request.content_length <= INLINE_BODY_BYTES:
            response = self.server.routes.handle(request)
            self._release()
            self._reply(response, keep_alive=request.keep_alive, http10=request.version == "HTTP/1.0")
            return
        self.busy = True
        assert self.transport is not None
        self.transport.pause_reading()
        future = self.server._pool.submit(self.server.routes.handle, request)
        loop = self.server._loop
        assert loop is not None
        future.add_done_callback(lambda f: self._call_soon(loop, request, f))

    def _wait_for_budget(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        if self.waiting_since is None:  # still waiting (woken by resume_writing): the wait goes on
            self.waiting_since = time.monotonic()
        self.server._waiting[self] = None

    def wake(self) -> None:
        """The budget moved: read again (and take what is buffered) unless something else holds us."""
        if self.waiting_since is None or self.closing:
            return
        if self.request_started is not None:  # time spent waiting for the budget is not the client's
            self.request_started += time.monotonic() - self.waiting_since
        self.waiting_since = None
        if self.transport is not None and not self.write_paused:
            self.transport.resume_reading()
            self._process()

    def _call_soon(self, loop: asyncio.AbstractEventLoop, request: Request, future: Future[Response]) -> None:
        # RuntimeError: the server stopped while the worker ran, and nobody is waiting for the answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, request, future)

    def _finish(self, request: Request, future: Future[Response]) -> None:
        self.busy = False
        self.server._answering -= 1
        self._release()
        if self.closing:
            return
        try:
            response = future.result()
        except Exception as exc:  # Routes.handle answers every error itself; this is a last resort
            log.exception("request %s failed", request.path)
            response = error_response(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")
        self._reply(response, keep_alive=request.keep_alive, http10=request.version == "HTTP/1.0")
        if not self.closing and self.transport is not None:
            self.transport.resume_reading()
            self._process()

    def _reply(self, response: Response, *, keep_alive: bool, http10: bool = False) -> None:
        keep = keep_alive and not response.close and not self.server._stopping
        assert self.transport is not None
        self.transport.write(encode_response(response, keep_alive=keep, http10=http10))
        self.last_activity = time.monotonic()
        self.request_started = time.monotonic() if self.buf else None
        if not keep:
            self.close()

    def close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()  # sends what is buffered, then closes

    # -- time limits -------------------------------------------------------------------------------

    def expired(self, now: float, timeout: float) -> bool:
        if self.busy or self.waiting_since is not None:
            return False
        if self.request_started is not None:
            return now - self.request_started > timeout
        return now - self.last_activity > timeout

    def time_out(self) -> None:
        if self.request_started is not None and not self.write_paused:
            self.server.agent.count_bad_request()
            seconds = self.server.limits.request_timeout
            self._reply(error_response(HTTPStatus.REQUEST_TIMEOUT,
                                       f"request not received within {seconds:g}s (http.timeout)"),
                        keep_alive=False)
        elif self.transport is not None:
            self.closing = True
            self.transport.abort()


class AgentHTTPServer:
    """Binds at construction (so a busy port fails early), serves from its own thread after `start()`."""

    def __init__(self, address: tuple[str, int], agent: Agent, limits: HttpLimits | None = None) -> None:
        self.agent = agent
        self.limits = limits or HttpLimits()
        self.routes = Routes(agent, self.limits)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(1024)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.server_address: tuple[Any, ...] = self._sock.getsockname()
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="http-worker")
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping = False
        self._body_bytes = 0  # large-body bytes received and not yet answered (see BODY_BUDGET_FACTOR)
        self._answering = 0  # large requests handed to the worker and not yet answered
        self._receiving: set[_Connection] = set()  # connections receiving a large body
        self._waiting: dict[_Connection, None] = {}  # stopped reading for the budget, oldest first
        self._waking = False
        self._wake_again = False

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(loop.create_server(lambda: _Connection(self), sock=self._sock))
        loop.call_soon(self._sweep)
        self._started.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.abort()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _admit(self, conn: _Connection) -> None:
        if len(self._connections) >= self.limits.max_connections:
            idle = [c for c in self._connections if not c.busy]
            if idle:
                victim = min(idle, key=lambda c: c.last_activity)
                log.warning("%d connections open (http.max_connections): closing the longest idle one",
                            len(self._connections))
                victim.closing = True
                if victim.transport is not None:
                    victim.transport.abort()
                self._connections.discard(victim)
            else:
                conn._reply(error_response(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, try again"),
                            keep_alive=False)
                return
        self._connections.add(conn)

    def _take_budget(self, conn: _Connection, n: int) -> bool:
        """Count `n` more arrived body bytes for `conn`, or say no (the connection then waits)."""
        limit = self.limits.max_body_bytes
        fits = self._body_bytes + n <= (BODY_BUDGET_FACTOR - 1) * limit
        if not fits and self._answering == 0 and self._body_bytes + n <= BODY_BUDGET_FACTOR * limit and self._receiving:
            # Nothing being answered will free the budget: let the fullest body finish, then the rest.
            fits = conn is max(self._receiving, key=lambda c: (c.reserved, -c.body_since))
        if fits:
            if not conn.reserved:
                conn.body_since = time.monotonic()
                self._receiving.add(conn)
            conn.reserved += n
            self._body_bytes += n
        return fits

    def _wake_waiting(self) -> None:
        if self._waking:  # a wake-up in progress goes round again
            self._wake_again = True
            return
        self._waking = True
        try:
            self._wake_again = True
            while self._wake_again:
                self._wake_again = False
                for conn in list(self._waiting):
                    if self._waiting.pop(conn, "gone") is None:
                        conn.wake()
        finally:
            self._waking = False

    def _sweep(self) -> None:
        if self._stopping or self._loop is None:
            return
        now = time.monotonic()
        timeout = self.limits.request_timeout
        for conn in [c for c in self._connections if c.expired(now, timeout)]:
            conn.time_out()
        self._loop.call_later(min(1.0, timeout / 4), self._sweep)

    def connection_count(self) -> int:
        return len(self._connections)

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        else:
            self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
