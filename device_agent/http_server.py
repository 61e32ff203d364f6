"""The agent's local HTTP API (DESIGN.md section 6): /predict, /labels, /healthz, /status.

Standard library only (`ThreadingHTTPServer`): a device needs a handful of requests per second
from a local application, not a web framework. A bad request gets a 4xx with a one-line JSON error
and is counted; the server keeps serving.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.errors import InputError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
NPY_TYPES = ("application/x-npy", "application/octet-stream")


class _Handler(BaseHTTPRequestHandler):
    server: AgentHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- helpers ---------------------------------------------------------------------------------

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _TooLarge(f"body is {length} bytes, the limit is {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def _json_body(self) -> dict[str, Any]:
        try:
            doc = json.loads(self._body() or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise InputError("body must be a JSON object")
        return doc

    # -- routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        agent = self.server.agent
        if self.path == "/healthz":
            self._send(HTTPStatus.OK, {"ok": True, "model": agent.model.runtime.info.as_dict()})
        elif self.path == "/status":
            self._send(HTTPStatus.OK, agent.status())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self) -> None:
        try:
            if self.path == "/predict":
                self._predict()
            elif self.path == "/labels":
                self._labels()
            else:
                self.close_connection = True  # the body was not read: do not reuse the connection
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        except _TooLarge as exc:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc))
        except InputError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # one failed request must not take the server down
            log.exception("request %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")

    def _predict(self) -> None:
        content_type = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        request_id = self.headers.get("X-Request-Id") or uuid.uuid4().hex
        if content_type in NPY_TYPES:
            try:
                inputs = np.load(io.BytesIO(self._body()), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                self.server.agent.count_bad_request()
                raise InputError(f"body is not a .npy array: {exc}") from exc
        else:
            doc = self._json_body()
            if "inputs" not in doc:
                self.server.agent.count_bad_request()
                raise InputError('JSON body needs "inputs": a sample or a batch of samples')
            try:
                inputs = np.asarray(doc["inputs"], dtype=np.float64)
            except (ValueError, TypeError) as exc:
                self.server.agent.count_bad_request()
                raise InputError(f'"inputs" is not a rectangular array of numbers: {exc}') from exc
            request_id = str(doc.get("request_id") or request_id)
        result = self.server.agent.predict(inputs, request_id=request_id)
        self._send(HTTPStatus.OK, {
            "outputs": result.outputs.tolist(),
            "predictions": result.labels,
            "classes": result.classes.tolist(),
            "request_id": request_id,
            "model": self.server.agent.model.runtime.info.as_dict(),
        })

    def _labels(self) -> None:
        doc = self._json_body()
        labels = doc.get("labels")
        if not isinstance(labels, list):
            self.server.agent.count_bad_request()
            raise InputError('JSON body needs "labels": a list of class names or indices')
        request_id = doc.get("request_id")
        counted = self.server.agent.feed_labels(labels, None if request_id is None else str(request_id))
        self._send(HTTPStatus.OK, {"counted": counted})


class _TooLarge(Exception):
    pass


class AgentHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], agent: Agent) -> None:
        super().__init__(address, _Handler)
        self.agent = agent
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
