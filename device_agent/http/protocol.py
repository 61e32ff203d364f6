"""HTTP/1.1 request heads in, whole responses out: the wire format of the agent's HTTP API, no I/O.

Strict on purpose, because everything here comes from the network: a request head is at most
MAX_HEAD_BYTES, CRLF-terminated, with at most MAX_HEADERS headers; a body needs a plain decimal
`Content-Length` (no sign, no spaces, no `Transfer-Encoding`, duplicates must agree), so the server
knows before reading a byte of the body whether it will accept it. Anything else is an `HttpError`
with the status to answer; the server answers it and closes the connection.

A response is built as ONE bytes object (status line, headers and body) so that it leaves in one
write: two small writes (head, then body) meet Nagle's algorithm and the client's delayed ACK and
cost 40 ms per keep-alive request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 64
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(frozen=True)
class HttpLimits:
    """What one client may make the agent do ([http] in agent.toml, --http-* flags)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_samples: int = 4096  # samples in one request, labels in one call
    max_connections: int = 64
    # Seconds to send one whole request, or to stay idle between requests. The config key and flag
    # users type stay `timeout` / `--http-timeout` (settings.py maps them).
    request_timeout: float = 10.0
    request_memory_bytes: int = 1024 * 1024  # predictions remembered for labels that name a request id


class HttpError(Exception):
    """A request the server refuses: `status` is the answer, the message its one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)


@dataclass(slots=True)
class Request:
    method: str
    path: str  # without the query string
    query: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str]  # lower-case names
    content_length: int
    keep_alive: bool
    expect_continue: bool
    # A large body arrives in place in its own anonymous memory map and is handed over as a view of it.
    body: bytes | memoryview = field(default=b"", repr=False)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


def parse_head(buf: bytes | bytearray, max_body: int) -> tuple[Request, int] | None:
    """The request head at the start of `buf` and its length in bytes; None while it is incomplete.

    Raises HttpError for a malformed head, a head over MAX_HEAD_BYTES, or a body the server will
    not read (missing, malformed or negative Content-Length on POST, over `max_body`, chunked).
    """
    start = 0
    while buf.startswith(b"\r\n", start):  # RFC 9112 2.2: ignore empty lines before a request line
        start += 2
    end = buf.find(b"\r\n\r\n", start, start + MAX_HEAD_BYTES + 4)
    if end < 0:
        if len(buf) - start > MAX_HEAD_BYTES:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"request head longer than {MAX_HEAD_BYTES} bytes")
        return None
    lines = bytes(buf[start:end]).decode("latin-1").split("\r\n")
    method, target, version = _request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not _TOKEN.issuperset(name):
            # Covers obsolete line folding and whitespace before the colon: both are smuggling vectors.
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:60]!r}")
        key, value = name.lower(), value.strip(" \t")
        if key == "content-length":
            lengths.add(value)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise HttpError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not accepted: send the body with Content-Length")
    content_length = _content_length(method, lengths, max_body)
    path, _, query = target.partition("?")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    expect = headers.get("expect", "").lower()
    if expect and expect != "100-continue":
        raise HttpError(HTTPStatus.EXPECTATION_FAILED, f"unsupported Expect: {expect[:40]!r}")
    request = Request(method, path, query, version, headers, content_length, keep_alive,
                      bool(expect) and content_length > 0)
    return request, end + 4


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed request line {line[:80]!r}")
    method, target, version = parts
    if not method or not _TOKEN.issuperset(method):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed method {method[:20]!r}")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed request target {target[:80]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"{version[:20]} is not supported")
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed HTTP version {version[:20]!r}")
    return method, target, version


def _content_length(method: str, values: set[str], max_body: int) -> int:
    if not values:
        if method in BODY_METHODS:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{method} needs a Content-Length header")
        return 0
    if len(values) > 1:
        raise HttpError(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers")
    (value,) = values
    # Only ASCII digits: int() would also take "+5", " 5", "5_0" and non-ASCII digits.
    if not value or len(value) > 18 or not value.isascii() or not value.isdigit():
        raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length {value[:30]!r} is not a non-negative integer")
    length = int(value)
    if length > max_body:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body is {length} bytes, the limit is {max_body} (http.max_body_bytes)")
    return length


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this response


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode("ascii")
        _STATUS_LINES[status] = line
    return line


def encode_response(response: Response, *, keep_alive: bool, http10: bool = False,
                    extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """The whole response as one bytes object, ready for a single write."""
    head = [f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"]
    for name, value in (*response.headers, *extra):
        head.append(f"{name}: {value}\r\n")
    if not keep_alive:
        head.append("Connection: close\r\n")
    elif http10:
        head.append("Connection: keep-alive\r\n")
    head.append("\r\n")
    return b"".join((_status_line(response.status), "".join(head).encode("latin-1"), response.body))


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
