"""Uploads captured records and label updates to the fleet server, on its own thread.

Every `interval` seconds a round sends the spool's oldest records in batches (`batch_records`,
`batch_bytes`) to `POST {url}/api/captures/upload`, then waiting label updates to
`POST {url}/api/captures/labels`, until both are empty or the fleet does not take one. What an answer
does (docs/captures.md):

- 200: every record of the batch leaves the spool (stored, duplicate or rejected; the rejected are
  counted and logged);
- 400: the batch is malformed for this fleet, resending cannot help: dropped, counted as rejected;
- 413: the fleet's body limit is under `batch_bytes`: the next batches are half the size (a single
  record over the limit is dropped as rejected);
- 401 / 403 (the credential), 507 (the fleet's store is full), 5xx, any other answer, no answer: the
  records stay and the round ends; the next waits twice as long (with jitter), up to 5 minutes, and
  a success returns to `interval`.

A connection that dies after the request went out but before the answer came (the fleet crashed,
the link dropped) is "no answer": the records stay and the next round sends the same ids, which the
fleet stores once. The device shows who it is with `X-Edgekit-Device` plus `Authorization: Device
<token>` (`token_file`, re-read each round, so a re-enrolled token is picked up) and/or its client
certificate over https (the TLS context). Redirects are not followed: a POST must reach the fleet itself.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.capture.config import LABELS_PATH, UPLOAD_PATH
from device_agent.capture.store import Batch, CaptureStore
from device_agent.errors import SpoolError
from device_agent.uplink.https import DEVICE_HEADER

log = logging.getLogger(__name__)

UPLOAD_SCHEMA = "edgekit.captures/1"
LABELS_SCHEMA = "edgekit.capture_labels/1"
MAX_LABELS_PER_REQUEST = 10_000
BACKOFF_MAX_S = 300.0
MAX_ANSWER_BYTES = 1 << 20  # a 200 answer lists at most 1,000 rejected ids
MAX_ERROR_CHARS = 300


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: kept and retried, never re-sent elsewhere as GET


class Uploader:
    def __init__(self, store: CaptureStore, *, url: str, device_id: str, token_file: Path | None = None,
                 context: ssl.SSLContext | None = None, batch_records: int = 64, batch_bytes: int = 1 << 20,
                 interval: float = 10.0, timeout: float = 30.0, backoff_max: float = BACKOFF_MAX_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.url = url.rstrip("/")
        self.device_id = device_id
        self.token_file = token_file
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.interval = interval
        self.timeout = timeout
        self.backoff_max = backoff_max
        self._clock = clock
        handlers: list[Any] = [_NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._limit_bytes = batch_bytes  # lowered after a 413
        self.failures = 0  # rounds in a row that ended on a failure
        self.last_upload: float | None = None
        self.last_error: str | None = None
        self.batches = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="capture-upload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the request in flight (its records stay spooled if it does not finish)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Start a round now (tests, shutdown of a backoff)."""
        self._wake.set()

    def _run(self) -> None:
        delay = self.interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                ok = self.upload_round()
            except Exception as exc:  # a bug must not end uploads for the life of the process
                log.exception("capture upload round failed")
                self.last_error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                ok = False
            delay = self.next_delay(ok)

    def next_delay(self, ok: bool) -> float:
        """`interval` after a good round; after failures, doubling with jitter up to `backoff_max`."""
        if ok:
            self.failures = 0
            return self.interval
        self.failures += 1
        base = min(self.backoff_max, self.interval * 2.0 ** min(self.failures, 20))
        return float(min(self.backoff_max, base * random.uniform(0.75, 1.25)))

    # -- one round ----------------------------------------------------------------------------------

    def upload_round(self) -> bool:
        """Send records, then label updates, until none wait; False when the fleet did not take one."""
        headers = self._headers()
        if headers is None:
            return False
        while not self._stop.is_set():
            batch = self.store.next_batch(self.batch_records, self._limit_bytes)
            if not batch.seqs:
                break
            if not self._send_records(batch, headers):
                return False
        while not self._stop.is_set():
            labels = self.store.next_labels(MAX_LABELS_PER_REQUEST)
            if not labels.seqs:
                break
            body = {"schema": LABELS_SCHEMA, "device": self.device_id,
                    "labels": [{"id": record_id, "label": label} for record_id, label in labels.labels]}
            status, answer, error = self._post(LABELS_PATH, json.dumps(body).encode(), headers)
            if status == 200:
                self.store.ack_labels(labels)
                self._succeeded()
            elif status == 400:
                self.store.ack_labels(labels, dropped=True)
                self._failed(f"label updates refused as malformed (400): {_excerpt(answer)}", log.error)
            else:
                self._failed(_why(LABELS_PATH, status, answer, error))
                return False
        return True

    def _send_records(self, batch: Batch, headers: dict[str, str]) -> bool:
        head = json.dumps({"schema": UPLOAD_SCHEMA, "device": self.device_id})[:-1]
        body = f'{head}, "records": [{",".join(batch.docs)}]}}'.encode()
        status, answer, error = self._post(UPLOAD_PATH, body, headers)
        self.batches += 1
        try:
            if status == 200:
                rejected = _rejected_ids(answer, batch)
                self.store.ack(batch, rejected=set(rejected))
                if rejected:
                    log.warning("the fleet rejected %d of %d captured records, e.g. %s", len(rejected), len(batch.ids),
                                next(iter(rejected.items())))
                self._limit_bytes = self.batch_bytes
                self._succeeded()
                return True
            if status == 400:
                self.store.drop(batch)
                self._failed(f"a batch of {len(batch.ids)} records refused as malformed (400), dropped: "
                             f"{_excerpt(answer)}", log.error)
                return True
            if status == 413:
                if len(batch.ids) == 1:
                    self.store.drop(batch)
                    self._failed(f"a record of {batch.size} bytes is over the fleet's body limit (413), dropped",
                                 log.error)
                else:
                    self._limit_bytes = max(1, batch.size // 2)
                    self._failed(f"a batch of {batch.size} bytes is over the fleet's body limit (413); "
                                 f"sending at most {self._limit_bytes} bytes per batch")
                return True
        except SpoolError as exc:  # the answer came but the spool cannot record it: the records go again
            self._failed(str(exc))
            return False
        self._failed(_why(UPLOAD_PATH, status, answer, error))
        return False

    def _headers(self) -> dict[str, str] | None:
        headers = {DEVICE_HEADER: self.device_id, "Content-Type": "application/json", "Accept": "application/json"}
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                self._failed(f"cannot read the upload token {self.token_file}: {exc}")
                return None
            headers["Authorization"] = f"Device {token}"
        return headers

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, bytes, str | None]:
        """(status, answer body, None) for any HTTP answer; (None, b"", why) when none came."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return int(response.status), response.read(MAX_ANSWER_BYTES), None
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    answer = exc.read(MAX_ANSWER_BYTES)
                except (OSError, http.client.HTTPException):
                    answer = b""
            return int(exc.code), answer, None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            return None, b"", f"{type(exc).__name__}: {reason}"

    def _succeeded(self) -> None:
        self.last_upload = self._clock()
        self.last_error = None

    def _failed(self, why: str, level: Callable[..., None] | None = None) -> None:
        why = why[:MAX_ERROR_CHARS]
        if why != self.last_error:  # once per run of the same failure, not every round
            (level or log.warning)("capture upload: %s", why)
        self.last_error = why

    def status(self) -> dict[str, Any]:
        return {"last_upload": self.last_upload, "last_upload_error": self.last_error,
                "failures_in_a_row": self.failures}


def _rejected_ids(answer: bytes, batch: Batch) -> dict[str, str]:
    """Record id -> reason for the records a 200 answer rejected (ids outside the batch ignored)."""
    try:
        doc = json.loads(answer)
        items = doc.get("rejected", []) if isinstance(doc, dict) else []
    except ValueError:
        log.warning("the fleet's 200 answer to a capture upload is not JSON: %s", _excerpt(answer))
        return {}
    ids = set(batch.ids)
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("id") in ids:
            out[str(item["id"])] = str(item.get("reason", ""))[:200]
    return out


def _excerpt(answer: bytes) -> str:
    return answer[:200].decode("utf-8", "replace").strip()


def _why(path: str, status: int | None, answer: bytes, error: str | None) -> str:
    if status is None:
        return f"no answer from the fleet ({path}): {error}; records kept, retrying"
    kept = "records kept, retrying"
    if status in (401, 403):
        return f"the fleet refused this device's credential ({status}: {_excerpt(answer)}); {kept}"
    if status == 507:
        return f"the fleet's capture store is full (507); {kept}"
    return f"the fleet answered {status} ({path}): {_excerpt(answer)}; {kept}"
