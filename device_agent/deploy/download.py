"""Fetch a bundle over HTTP(S) into a staging folder, resuming after a kill or a dropped link.

The bytes go to `<staging>/<sha256>.part`, appended as they arrive. A later call (after the link
dropped, or after the process was killed and started again) asks only for the rest with
`Range: bytes=<have>-` and `If-Range: "<sha256>"`: a server that still has that exact file answers
206 with the rest, one that does not answers 200 with the whole file, and the part is started over.
So a killed download costs the bytes in flight, not the bytes already on disk.

Nothing is trusted until the whole file hashes to the expected sha256: then the part is renamed to
`<staging>/<sha256>.bundle` and returned. A file of the wrong hash is deleted and refused for good
(`DownloadFailed(permanent=True)`): fetching it again would give the same bytes. The size the
deployment names must fit under the caller's cap, and no more than that size is ever written.

Retries: a refused or dropped connection, a 5xx or a 429 is retried with exponential backoff and
jitter; a 503 or 429 with `Retry-After` waits that long (bounded), which is how the fleet's cap on
concurrent downloads spreads a rollout out. Other 4xx answers are permanent (a 401 or 403 from a fleet
server that wants this device's client certificate, `DownloadPolicy.certfile`, among them). Stdlib
only (no ONNX Runtime): the rollout benchmark runs a thousand of these at once.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import os
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.errors import EdgeKitError
from device_agent.uplink.https import DEVICE_HEADER, client_tls_context

PART_SUFFIX, DONE_SUFFIX = ".part", ".bundle"
_CHUNK = 64 * 1024
MAX_RETRY_AFTER = 600.0  # a server asking for longer is capped: the device keeps trying


class DownloadFailed(EdgeKitError):
    """The download did not produce the expected file; `permanent` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass
class DownloadStats:
    """What one `download` call did: bytes received over the network, requests, and where it began."""

    received: int = 0
    requests: int = 0
    resumed_from: int = 0
    waits: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DownloadPolicy:
    """How long and how hard to try. `give_up_after` bounds one call; the caller may call again."""

    timeout: float = 30.0  # per connect and per read: a silent link counts as dropped
    give_up_after: float = 3600.0
    backoff_min: float = 0.5
    backoff_max: float = 60.0
    ca_file: str | None = None  # for https:// URLs signed by a private CA (replaces the system's CAs)
    also_trust: str | None = None  # a CA trusted besides the system's (the fleet CA, from the MQTT settings)
    certfile: str | None = None  # this device's client certificate, for a server that asks for one
    keyfile: str | None = None


def tls_context(policy: DownloadPolicy) -> ssl.SSLContext:
    """The TLS settings of https:// downloads: which CAs sign servers, and this device's certificate.
    A fleet server with a client CA knows the device by that certificate (docs/agent.md)."""
    try:
        return client_tls_context(ca_file=policy.ca_file, also_trust=policy.also_trust, certfile=policy.certfile,
                                  keyfile=policy.keyfile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise DownloadFailed(f"cannot use the download TLS files: {exc}", permanent=True) from None


def staged_path(staging: Path, sha256: str) -> Path:
    return staging / f"{sha256}{DONE_SUFFIX}"


def part_path(staging: Path, sha256: str) -> Path:
    return staging / f"{sha256}{PART_SUFFIX}"


class _Retry(Exception):
    """A transient failure; `after` is the server's Retry-After in seconds, when it gave one."""

    def __init__(self, reason: str, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


def download(
    url: str,
    *,
    sha256: str,
    size: int,
    staging: Path,
    device_id: str,
    max_bytes: int,
    policy: DownloadPolicy | None = None,
    stop: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
    stats: DownloadStats | None = None,
) -> Path:
    """Download `url` (which must be `size` bytes hashing to `sha256`) into `staging`; the verified path.

    Raises DownloadFailed: `permanent` for a size over `max_bytes`, a wrong hash or a 4xx answer;
    otherwise after `policy.give_up_after` seconds of failed attempts, or when `stop` is set.
    `on_progress(bytes_on_disk)` is called as bytes arrive (from this thread).
    """
    policy = policy or DownloadPolicy()
    stats = stats if stats is not None else DownloadStats()
    stop = stop or threading.Event()
    if size > max_bytes:
        raise DownloadFailed(f"bundle is {size} bytes, over this device's cap of {max_bytes}", permanent=True)
    staging.mkdir(parents=True, exist_ok=True)
    done = staged_path(staging, sha256)
    if done.is_file():
        if file_sha256(done) == sha256:
            return done
        done.unlink()  # damaged on disk since: fetch again
    part = part_path(staging, sha256)
    stats.resumed_from = _usable_prefix(part, size)
    context = tls_context(policy) if url.startswith("https:") else None
    deadline = time.monotonic() + policy.give_up_after
    _fetch(url, part, sha256=sha256, size=size, device_id=device_id, policy=policy, context=context, stats=stats,
           on_progress=on_progress, stop=stop, deadline=deadline)
    actual = file_sha256(part)
    if actual != sha256 and stats.resumed_from:
        # The kept prefix may be what was wrong (a torn write before a power cut): once more from byte 0.
        part.unlink(missing_ok=True)
        _fetch(url, part, sha256=sha256, size=size, device_id=device_id, policy=policy, context=context,
               stats=stats, on_progress=on_progress, stop=stop, deadline=deadline)
        actual = file_sha256(part)
    if actual != sha256:
        part.unlink(missing_ok=True)
        _etag_path(part).unlink(missing_ok=True)
        raise DownloadFailed(f"downloaded file's sha256 is {actual[:16]}..., the deployment names "
                             f"{sha256[:16]}... (altered or wrong file)", permanent=True)
    with part.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(part, done)
    _etag_path(part).unlink(missing_ok=True)
    return done


def _fetch(url: str, part: Path, *, sha256: str, size: int, device_id: str, policy: DownloadPolicy,
           context: ssl.SSLContext | None, stats: DownloadStats, on_progress: Callable[[int], None] | None,
           stop: threading.Event, deadline: float) -> None:
    """Attempts until `part` holds `size` bytes, waiting between them as the server or the backoff says."""
    delay = policy.backoff_min
    while True:
        try:
            _attempt(url, part, sha256=sha256, size=size, device_id=device_id, timeout=policy.timeout,
                     context=context, stats=stats, on_progress=on_progress, stop=stop)
            return
        except _Retry as exc:
            if stop.is_set():
                raise DownloadFailed(f"stopped while downloading ({exc})", permanent=False) from None
            wait = min(exc.after, MAX_RETRY_AFTER) if exc.after is not None else random.uniform(delay / 2, delay)
            delay = min(policy.backoff_max, delay * 2)
            if time.monotonic() + wait > deadline:
                raise DownloadFailed(f"gave up after {policy.give_up_after:.0f}s: {exc}", permanent=False) from None
            stats.waits.append(wait)
            if stop.wait(wait):
                raise DownloadFailed(f"stopped while downloading ({exc})", permanent=False) from None


def _usable_prefix(part: Path, size: int) -> int:
    """Bytes of an earlier attempt to keep; a part longer than the file cannot be ours."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        part.unlink()
        return 0
    return have


def _attempt(url: str, part: Path, *, sha256: str, size: int, device_id: str, timeout: float,
             context: ssl.SSLContext | None, stats: DownloadStats, on_progress: Callable[[int], None] | None,
             stop: threading.Event) -> None:
    """One request: append the missing bytes to `part`; _Retry on anything worth another try."""
    have = _usable_prefix(part, size)
    if have == size:
        return  # complete from an earlier attempt; the caller checks the hash
    headers = {DEVICE_HEADER: device_id, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        # The validator the server gave for these bytes (a CDN's ETag is rarely the sha256); the fleet's is.
        headers["If-Range"] = _remembered_etag(part) or f'"{sha256}"'
    request = urllib.request.Request(url, headers=headers, method="GET")
    stats.requests += 1
    try:
        response = urllib.request.urlopen(request, timeout=timeout, context=context)
    except urllib.error.HTTPError as exc:
        try:
            _raise_for_status(exc.code, exc.headers.get("Retry-After"), part, have, url)
        finally:
            exc.close()
        return
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(f"cannot fetch {url}: {exc}") from None
    with response:
        start = _start_offset(response, have, size)
        if start == 0:
            _remember_etag(part, response.headers.get("ETag"))
        with part.open("r+b" if start else "wb") as f:
            f.seek(start)
            f.truncate()
            written = start
            try:
                while written < size:
                    if stop.is_set():
                        raise _Retry("stop requested")
                    # read1: whatever has arrived (read() would wait for a whole chunk, and a kill
                    # while waiting would lose it); flushed at once, so a kill loses no received byte.
                    chunk = response.read1(min(_CHUNK, size - written))
                    if not chunk:
                        raise _Retry(f"connection closed after {written} of {size} bytes")
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
                    stats.received += len(chunk)
                    if on_progress is not None:
                        on_progress(written)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"link dropped after {written} of {size} bytes: {exc}") from None


def _etag_path(part: Path) -> Path:
    return part.with_suffix(".etag")


def _remember_etag(part: Path, etag: str | None) -> None:
    path = _etag_path(part)
    if etag and etag.startswith('"') and len(etag) <= 256 and etag.isprintable():
        path.write_text(etag)
    else:
        path.unlink(missing_ok=True)


def _remembered_etag(part: Path) -> str | None:
    try:
        return _etag_path(part).read_text().strip() or None
    except OSError:
        return None


def _start_offset(response: http.client.HTTPResponse, have: int, size: int) -> int:
    """Where the body of this response starts in the file, checking that it is the file we expect."""
    status = response.status
    if status == 206:
        first, total = _content_range(response.headers.get("Content-Range", ""))
        if first != have or total not in (None, size):
            raise _Retry(f"server answered range {first}-/{total}, asked for {have}-/{size}")
        return have
    if status == 200:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != size:
            raise DownloadFailed(f"server sends {length} bytes, the deployment names {size}", permanent=True)
        return 0  # the whole file (no range support, or If-Range did not match): start over
    raise _Retry(f"unexpected HTTP {status}")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `*` total -> None."""
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        first = int(span.partition("-")[0])
        return (first, None if total == "*" else int(total)) if unit == "bytes" else (None, None)
    except ValueError:
        return None, None


def _raise_for_status(code: int, retry_after: str | None, part: Path, have: int, url: str) -> None:
    if code == 416:
        # Our part is no prefix of what the server has now: start over.
        part.unlink(missing_ok=True)
        raise _Retry(f"server refused the range from byte {have} (416); starting over")
    if code in (429, 503) or code >= 500 or code == 408:
        raise _Retry(f"server answered {code}", _retry_after_seconds(retry_after))
    raise DownloadFailed(f"server answered {code} for {url}", permanent=True)


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB pieces (bundles can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
