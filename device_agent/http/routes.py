"""What the agent answers over HTTP: /predict, /labels, /healthz, /status, and /v2/... (oip.py).

Every route ends in `Agent.predict` or `Agent.feed_labels`, the same code path as the embedded API,
so what is monitored and counted does not depend on how a request arrived. A request refused before
it reaches the agent (unparsable body, too many samples) is counted with `count_bad_request`; one
the agent refuses (`InputError`) is counted by the agent. Errors are `{"error": "..."}` bodies.
"""

from __future__ import annotations

import io
import logging
from http import HTTPStatus
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.errors import InputError
from device_agent.http import jsonio
from device_agent.http.oip import OpenInference
from device_agent.http.protocol import HttpError, HttpLimits, Request, Response
from device_agent.http.request_checks import RequestChecks

log = logging.getLogger(__name__)

NPY_TYPES = ("application/x-npy", "application/octet-stream")
NPY_HEAD_MAX = 10 + 65535  # magic, version, header length and the longest header numpy writes


def json_response(status: int, doc: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(int(status), jsonio.dumps(doc), headers=headers)


def error_response(status: int, message: str) -> Response:
    """The protocol's error body (OIP and the agent's own API alike): `{"error": "..."}`."""
    return Response(int(status), jsonio.dumps({"error": message}))


class Routes:
    def __init__(self, agent: Agent, limits: HttpLimits) -> None:
        self.agent = agent
        self.limits = limits
        self.checks = RequestChecks(agent, limits)
        self.oip = OpenInference(agent, self.checks)

    def handle(self, request: Request) -> Response:
        """The answer to one complete request; never raises."""
        try:
            if request.path.startswith("/v2"):
                return self.oip.handle(request)
            return self._own(request)
        except HttpError as exc:
            return error_response(exc.status, str(exc))
        except InputError as exc:
            return error_response(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # one failed request must not take the server down
            log.exception("request %s %s failed", request.method, request.path)
            return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")

    def _own(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path == "/predict" and method == "POST":
            return self._predict(request)
        if path == "/labels" and method == "POST":
            return self._labels(request)
        if path == "/healthz" and method == "GET":
            return json_response(HTTPStatus.OK, {"ok": True, "model": self.agent.model.runtime.info.as_dict()})
        if path == "/status" and method == "GET":
            return json_response(HTTPStatus.OK, self.agent.status())
        if path in ("/predict", "/labels", "/healthz", "/status"):
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
        return error_response(HTTPStatus.NOT_FOUND, f"no route {path}")

    # -- own API -----------------------------------------------------------------------------------

    def _predict(self, request: Request) -> Response:
        content_type = (request.header("content-type") or "application/json").split(";")[0].strip().lower()
        request_id = self.checks.request_id(request.header("x-request-id"))
        if content_type in NPY_TYPES:
            inputs = self.npy_array(request.body)
        else:
            doc = self.checks.json_body(request.body)
            if "inputs" not in doc:
                raise self.checks.bad('JSON body needs "inputs": a sample or a batch of samples')
            try:
                inputs = np.asarray(doc["inputs"], dtype=np.float32)
            except (ValueError, TypeError, OverflowError) as exc:
                raise self.checks.bad(f'"inputs" is not a rectangular array of numbers: {exc}') from exc
            request_id = self.checks.request_id(doc.get("request_id")) or request_id
        self.checks.check_samples(inputs)
        result = self.agent.predict(inputs, request_id=request_id)
        return json_response(HTTPStatus.OK, {
            "outputs": result.outputs,
            "predictions": result.labels,
            "classes": result.classes,
            "request_id": request_id,
            "model": self.agent.model.runtime.info.as_dict(),
        })

    def npy_array(self, body: bytes | memoryview) -> np.ndarray:
        """A .npy body as an array viewing the body's bytes (no copy); refuses pickles and short data."""
        f = io.BytesIO(bytes(memoryview(body)[:NPY_HEAD_MAX]))  # only the header is read from it
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} is not supported")
        except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
            raise self.checks.bad(f"body is not a .npy array: {exc}") from exc
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise self.checks.bad("body is not a .npy array of numbers (object arrays are refused)")
        count = int(np.prod(shape, dtype=np.int64))
        offset = f.tell()
        if len(body) - offset != count * dtype.itemsize:
            raise self.checks.bad(f"body is not a .npy array: {len(body) - offset} data bytes "
                                  f"for shape {shape} {dtype}")
        flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)

    def _labels(self, request: Request) -> Response:
        doc = self.checks.json_body(request.body)
        labels = doc.get("labels")
        if not isinstance(labels, list):
            raise self.checks.bad('JSON body needs "labels": a list of class names or indices')
        if len(labels) > self.limits.max_samples:
            raise self.checks.bad(f"{len(labels)} labels in one request, the limit is {self.limits.max_samples}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        counted = self.agent.feed_labels(labels, self.checks.request_id(doc.get("request_id")))
        return json_response(HTTPStatus.OK, {"counted": counted})
