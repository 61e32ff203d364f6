"""HTTP API of field captures (mounted by `fleet.server.make_app` when the server keeps captures).

POST /api/captures/upload                 a device's batch (device credential): {"stored", "duplicates", "rejected"}
POST /api/captures/labels                 a device's label updates (device credential): {"updated", "unknown", ...}
GET  /api/captures/counts                 held, labelled and bytes per device and model version
GET  /api/captures                        ?devices=a,b&since=UNIX&labelled_only=1&after=CURSOR&limit=N: records
                                          with inputs in stored order, and `next` while there are more
POST /api/devices/<device>/capture-request  {"samples", "reason"}: stored and published retained (operator)

The security middleware authenticates the device routes (client certificate or device token, never the
operator token) and puts the device in the request scope (`DEVICE_SCOPE_KEY`); the export takes the
operator token only, whatever `--open-reads` says: it holds the devices' real inputs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge_kit.fleet.captures.intake import Captures
from edge_kit.fleet.captures.requests import CaptureRequests
from edge_kit.fleet.captures.store import CaptureStoreFull
from edge_kit.fleet.captures.validation import CaptureError
from edge_kit.fleet.http_security import DEVICE_SCOPE_KEY

Json = Callable[[Any, int], Response]
Body = Callable[[bytes], Any]
Handler = Callable[[Request], Awaitable[Response]]


def capture_routes(captures: Captures | None, requests: CaptureRequests | None, json_response: Json,
                   parse_body: Body, guard: Callable[[Handler], Handler]) -> list[Route]:
    def guarded(fn: Handler) -> Handler:
        async def wrapper(request: Request) -> Response:
            try:
                return await fn(request)
            except CaptureError as exc:
                return json_response({"error": str(exc)}, exc.status)
            except CaptureStoreFull as exc:
                return json_response({"error": "capture store full", "detail": str(exc)}, 507)
        return guard(wrapper)

    def device_of(request: Request) -> str:
        device = request.scope.get(DEVICE_SCOPE_KEY)
        if not isinstance(device, str):  # the middleware sets it on every device route; never reached
            raise CaptureError(401, "no device credential")
        return device

    def body_of(raw: bytes) -> Any:
        try:
            return parse_body(raw)
        except ValueError as exc:
            raise CaptureError(400, str(exc)) from exc

    routes: list[Route] = []
    if captures is not None:
        async def upload(request: Request) -> Response:
            body = body_of(await request.body())
            return json_response(await run_in_threadpool(captures.upload, device_of(request), body), 200)

        async def labels(request: Request) -> Response:
            body = body_of(await request.body())
            return json_response(await run_in_threadpool(captures.set_labels, device_of(request), body), 200)

        async def counts(request: Request) -> Response:
            return json_response(await run_in_threadpool(captures.counts), 200)

        async def export(request: Request) -> Response:
            return json_response(await run_in_threadpool(captures.export, dict(request.query_params)), 200)

        routes += [
            Route("/api/captures/upload", guarded(upload), methods=["POST"]),
            Route("/api/captures/labels", guarded(labels), methods=["POST"]),
            Route("/api/captures/counts", guarded(counts), methods=["GET"]),
            Route("/api/captures", guarded(export), methods=["GET"]),
        ]
    if requests is not None:
        async def capture_request(request: Request) -> Response:
            body = body_of(await request.body())
            if not isinstance(body, dict) or set(body) - {"samples", "reason"}:
                raise CaptureError(400, "a capture request is {\"samples\": N, \"reason\": \"...\"}")
            message = await run_in_threadpool(requests.create, request.path_params["device"], body.get("samples"),
                                              body.get("reason", ""))
            return json_response(message, 201)

        routes.append(Route("/api/devices/{device:str}/capture-request", guarded(capture_request), methods=["POST"]))
    return routes
