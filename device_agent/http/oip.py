"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST API) over the agent's one model.

    GET  /v2                                   server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready     200 when live / when a model serves
    GET  /v2/models/{name}[/versions/{v}]       model metadata: inputs, outputs, datatypes, shapes
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer JSON tensors, or the binary tensor data extension

The model's name is the bundle's name and its only version the bundle's version. An inference goes
through `Agent.predict` like `/predict` (monitored, summarised, counted); the request's `id` is the
request id that late labels may name. Errors are the protocol's `{"error": "..."}` with 400 (bad
request, counted as one) or 404 (no such model or version).

Binary tensor data: with an `Inference-Header-Content-Length: N` header the first N body bytes are
the JSON header and each input with `parameters.binary_data_size` takes its bytes, in order, from
the rest (little-endian, row-major); they are viewed, not copied. Outputs come back binary when the
request asks (`outputs[i].parameters.binary_data` or `parameters.binary_data_output`).
"""

from __future__ import annotations

from http import HTTPStatus
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from device_agent.http import jsonio
from device_agent.http.protocol import HttpError, Request, Response

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.http.request_checks import RequestChecks

DATATYPE = "FP32"  # what the agent's models take and give (ModelRuntime runs float32)
BINARY_EXTENSION = "binary_tensor_data"


def _server_version() -> str:
    try:
        return metadata.version("edge-kit")
    except metadata.PackageNotFoundError:
        return "0"


class OpenInference:
    def __init__(self, agent: Agent, checks: RequestChecks) -> None:
        self.checks = checks
        self.agent = agent
        self.server_doc = jsonio.dumps({"name": "edge-agent", "version": _server_version(),
                                        "extensions": [BINARY_EXTENSION]})

    def handle(self, request: Request) -> Response:
        parts = request.path.split("/")[2:]  # after "", "v2"
        method = request.method
        if parts in ([], [""]):
            return self._only("GET", method, lambda: Response(HTTPStatus.OK, self.server_doc))
        if parts == ["health", "live"]:
            return self._only("GET", method, lambda: _ok({"live": True}))
        if parts == ["health", "ready"]:
            return self._only("GET", method, lambda: _ok({"ready": True}))
        if len(parts) >= 2 and parts[0] == "models":
            name, rest = unquote(parts[1]), parts[2:]
            version = None
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = unquote(rest[1]), rest[2:]
            if rest == []:
                return self._only("GET", method, lambda: self._metadata(name, version))
            if rest == ["ready"]:
                return self._only("GET", method, lambda: self._ready(name, version))
            if rest == ["infer"]:
                return self._only("POST", method, lambda: self._infer(request, name, version))
        return Response(HTTPStatus.NOT_FOUND, jsonio.dumps({"error": f"no route {request.path}"}))

    @staticmethod
    def _only(allowed: str, method: str, answer: Any) -> Response:
        if method != allowed:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here, use {allowed}")
        result: Response = answer()
        return result

    def _model(self, name: str, version: str | None) -> Any:
        runtime = self.agent.model.runtime
        info = runtime.info
        if name != info.name:
            raise HttpError(HTTPStatus.NOT_FOUND, f"unknown model {name!r}: this agent serves {info.name!r}")
        if version not in (None, "", info.version):
            raise HttpError(HTTPStatus.NOT_FOUND,
                            f"model {name!r} has no version {version!r}: this agent serves {info.version!r}")
        return runtime

    def _metadata(self, name: str, version: str | None) -> Response:
        runtime = self._model(name, version)
        return _ok({
            "name": runtime.info.name,
            "versions": [runtime.info.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": runtime.input_name, "datatype": DATATYPE, "shape": [-1, *runtime.sample_shape]}],
            "outputs": [{"name": runtime.output_names[0], "datatype": DATATYPE, "shape": [-1, runtime.n_classes]}],
            "parameters": {"sha256": runtime.info.sha256, "labels": list(runtime.labels)},
        })

    def _ready(self, name: str, version: str | None) -> Response:
        runtime = self._model(name, version)
        return _ok({"name": runtime.info.name, "ready": True})

    # -- inference ---------------------------------------------------------------------------------

    def _infer(self, request: Request, name: str, version: str | None) -> Response:
        checks = self.checks
        try:
            runtime = self._model(name, version)
        except HttpError:
            self.agent.count_bad_request()
            raise
        if request.header("content-encoding", "identity").lower() != "identity":
            raise checks.bad("compressed request bodies are not accepted", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        body = request.body
        header_length = request.header("inference-header-content-length")
        if header_length:
            # At most 18 digits before int(): 5,000 digits would raise (Python caps int() at 4,300).
            if (len(header_length) > 18 or not (header_length.isascii() and header_length.isdigit())
                    or int(header_length) > len(body)):
                raise checks.bad(f"Inference-Header-Content-Length {header_length[:20]!r} does not fit the body "
                                 f"of {len(body)} bytes")
            json_end = int(header_length)
        else:
            json_end = len(body)
        doc = checks.json_body(memoryview(body)[:json_end])
        tensors = doc.get("inputs")
        if not isinstance(tensors, list) or len(tensors) != 1 or not isinstance(tensors[0], dict):
            raise checks.bad(f'"inputs" must be a list of one tensor, {runtime.input_name!r}')
        x = self._input(tensors[0], runtime, body, json_end)
        checks.check_samples(x)
        request_id = checks.request_id(doc.get("id"))
        outputs_binary = self._outputs_binary(doc, runtime.output_names[0])
        result = self.agent.predict(x, request_id=request_id)
        out = np.ascontiguousarray(result.outputs, dtype="<f4")
        tensor: dict[str, Any] = {"name": runtime.output_names[0], "datatype": DATATYPE, "shape": list(out.shape)}
        answer: dict[str, Any] = {"model_name": runtime.info.name, "model_version": runtime.info.version}
        if request_id is not None:
            answer["id"] = request_id
        answer["outputs"] = [tensor]
        if not outputs_binary:
            tensor["data"] = out.reshape(-1)
            return _ok(answer)
        raw = out.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = jsonio.dumps(answer)
        return Response(HTTPStatus.OK, head + raw, content_type="application/octet-stream",
                        headers=(("Inference-Header-Content-Length", str(len(head))),))

    def _input(self, tensor: dict[str, Any], runtime: Any, body: bytes | memoryview, binary_start: int) -> np.ndarray:
        bad = self.checks.bad
        name = tensor.get("name")
        if name != runtime.input_name:
            raise bad(f"unknown input {name!r}: the model's input is {runtime.input_name!r}")
        datatype = tensor.get("datatype")
        if datatype != DATATYPE:
            raise bad(f"input {name!r} has datatype {datatype!r}: the model takes {DATATYPE}")
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and shape and len(shape) <= 8
                and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise bad(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        count = 1
        for d in shape:
            count *= d
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad(f"input {name!r}: parameters must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size != count * 4:
                raise bad(f"input {name!r}: binary_data_size {size!r} is not {count} FP32 values ({count * 4} bytes)")
            if len(body) - binary_start != size:
                raise bad(f"input {name!r}: {len(body) - binary_start} bytes of binary data, expected {size}")
            return np.frombuffer(body, dtype="<f4", count=count, offset=binary_start).reshape(shape)
        if "data" not in tensor:
            raise bad(f"input {name!r} has neither \"data\" nor parameters.binary_data_size")
        try:
            x = np.asarray(tensor["data"], dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            raise bad(f"input {name!r}: data is not a rectangular array of numbers: {exc}") from exc
        if x.size != count:
            raise bad(f"input {name!r}: {x.size} values do not fill shape {shape}")
        return x.reshape(shape)

    def _outputs_binary(self, doc: dict[str, Any], output_name: str) -> bool:
        parameters = doc.get("parameters") or {}
        binary = bool(isinstance(parameters, dict) and parameters.get("binary_data_output"))
        requested = doc.get("outputs")
        if requested is None:
            return binary
        if not isinstance(requested, list):
            raise self.checks.bad('"outputs" must be a list of requested outputs')
        for item in requested:
            if not isinstance(item, dict) or item.get("name") != output_name:
                name = item.get("name") if isinstance(item, dict) else item
                raise self.checks.bad(f"unknown output {name!r}: the model's output is {output_name!r}")
            params = item.get("parameters") or {}
            if isinstance(params, dict) and "binary_data" in params:
                binary = bool(params["binary_data"])
        return binary


def _ok(doc: Any) -> Response:
    return Response(HTTPStatus.OK, jsonio.dumps(doc))
