"""HTTP API of deployments (mounted by `fleet.server.make_app` when the server deploys).

GET  /api/deployments                      every deployment, newest first
POST /api/deployments                      create: {"bundle_sha256" | "bundle_path" | "url" + "sha256" + "size" +
                                           "name" + "version", "devices"?, "canary", "canary_windows",
                                           "auto_promote", "seed"?}
GET  /api/deployments/<id>                 one deployment: state, devices' versions and steps, canary figures
POST /api/deployments/<id>/promote|halt|rollback
POST /api/bundles                          upload a chunk: {"sha256", "size", "offset", "data" (base64)}
GET  /api/bundles/<sha256> (and HEAD)      the bundle bytes: Range, ETag, caps (503 + Retry-After, 429)

Writes need the operator token (the security middleware). Bundle downloads need the device's client
certificate when the server has a client CA (`--tls-client-ca`); the per-device byte cap then keys on
the certificate's device. Without one they are open to anyone who reaches the server and the cap keys on
the `X-Edgekit-Device` header: bundles are signed, not secret (docs/deploy.md).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeGuard

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from edge_kit.fleet.deployments.bundles import SHA256, BundleError, parse_range
from edge_kit.fleet.deployments.rollout import BundleSource, RolloutManager
from edge_kit.fleet.http_security import certified_device

DOWNLOAD_CHUNK = 64 * 1024
MAX_UPLOAD_BYTES = 2 << 30
_DEVICE = re.compile(r"[^/+#\x00]{1,128}")


Json = Callable[[Any, int], Response]
Body = Callable[[bytes], Any]


def deployment_routes(manager: RolloutManager, json_response: Json, parse_body: Body,
                      guard: Callable[[Callable[[Request], Awaitable[Response]]],
                                      Callable[[Request], Awaitable[Response]]]) -> list[Route]:
    limits, slots = manager.download_limits, manager.download_slots

    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            try:
                return await fn(request)
            except BundleError as exc:
                return json_response({"error": str(exc)}, exc.status)
        return guard(wrapper)

    async def listing(request: Request) -> Response:
        return json_response({"deployments": await run_in_threadpool(manager.list)}, 200)

    async def create(request: Request) -> Response:
        body = parse_body(await request.body())
        if not isinstance(body, dict):
            raise BundleError(400, "deployment body must be a JSON object")
        view = await run_in_threadpool(_create, manager, body)
        return json_response(view, 201)

    async def show(request: Request) -> Response:
        return json_response(await run_in_threadpool(manager.view, request.path_params["dep_id"]), 200)

    async def action(request: Request) -> Response:
        dep_id, what = request.path_params["dep_id"], request.path_params["action"]
        act = {"promote": manager.promote, "halt": manager.halt, "rollback": manager.rollback}.get(what)
        if act is None:
            raise BundleError(404, f"no action {what!r}: promote, halt or rollback")
        return json_response(await run_in_threadpool(act, dep_id), 200)

    async def upload(request: Request) -> Response:
        body = parse_body(await request.body())
        if not isinstance(body, dict):
            raise BundleError(400, "upload body must be a JSON object")
        sha, size, offset, data = body.get("sha256"), body.get("size"), body.get("offset"), body.get("data")
        if not (isinstance(sha, str) and _is_int(size) and _is_int(offset) and isinstance(data, str)):
            raise BundleError(400, "upload needs string 'sha256', integer 'size' and 'offset', base64 'data'")
        try:
            chunk = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BundleError(400, f"'data' is not base64: {exc}") from exc
        result = await run_in_threadpool(manager.files.upload_chunk, sha, size, offset, chunk, MAX_UPLOAD_BYTES)
        return json_response(result, 200)

    async def download(request: Request) -> Response:
        sha = request.path_params["sha256"]
        if not SHA256.fullmatch(sha):
            raise BundleError(404, "bundles are named by the sha256 of the file (64 lowercase hex digits)")
        stored = await run_in_threadpool(manager.files.by_sha256, sha)
        if stored is None:
            raise BundleError(404, f"this server holds no bundle {sha[:16]}...")
        etag = f'"{sha}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "no-cache",
                   "Content-Type": "application/octet-stream"}
        if_range = request.headers.get("if-range")
        ranged = request.headers.get("range") if if_range in (None, etag) else None
        try:
            span = parse_range(ranged, stored.size)
        except BundleError as exc:
            return Response(str(exc).encode(), 416, {**headers, "Content-Range": f"bytes */{stored.size}"})
        start, end = span if span is not None else (0, stored.size - 1)
        status = 206 if span is not None else 200
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{stored.size}"
        headers["Content-Length"] = str(end - start + 1)
        if request.method == "HEAD":
            return Response(b"", status, headers)
        # The middleware refused a header that contradicts the certificate; the certificate wins.
        device = certified_device(request.scope) or request.headers.get("x-edgekit-device")
        counted = await run_in_threadpool(_deployment_of, manager, sha, device)
        if counted is not None:
            served = manager.store.served_bytes(counted, device or "") or 0
            if served >= limits.per_device_factor * stored.size:
                return json_response({"error": f"device {device} already fetched {served} bytes of this bundle "
                                               f"(cap {limits.per_device_factor:g} x its size)"}, 429)
        if not slots.acquire():
            return Response(b'{"error": "too many downloads at once; retry later"}', 503,
                            {"Retry-After": str(limits.retry_after), "Content-Type": "application/json",
                             "Cache-Control": "no-store"})
        return StreamingResponse(_stream(manager, stored.path, start, end, slots, counted, device),
                                 status_code=status, headers=headers)

    return [
        Route("/api/deployments", guarded(listing), methods=["GET"]),
        Route("/api/deployments", guarded(create), methods=["POST"]),
        Route("/api/deployments/{dep_id:str}", guarded(show), methods=["GET"]),
        Route("/api/deployments/{dep_id:str}/{action:str}", guarded(action), methods=["POST"]),
        Route("/api/bundles", guarded(upload), methods=["POST"]),
        Route("/api/bundles/{sha256:str}", guarded(download), methods=["GET", "HEAD"]),
    ]


async def _stream(manager: RolloutManager, path: Any, start: int, end: int, slots: Any, dep_id: str | None,
                  device: str | None) -> AsyncIterator[bytes]:
    sent = 0
    try:
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = await run_in_threadpool(f.read, min(DOWNLOAD_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                sent += len(chunk)
                yield chunk
    finally:
        slots.release()
        if dep_id is not None and device and sent:
            await run_in_threadpool(manager.store.add_served_bytes, dep_id, device, sent)


def _deployment_of(manager: RolloutManager, sha: str, device: str | None) -> str | None:
    """The newest deployment of this bundle that targets `device` (its bytes are counted against the cap)."""
    if not device or not _DEVICE.fullmatch(device):
        return None
    for dep in manager.store.for_bundle(sha):
        if manager.store.served_bytes(dep["id"], device) is not None:
            return str(dep["id"])
    return None


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _create(manager: RolloutManager, body: dict[str, Any]) -> dict[str, Any]:
    allowed = {"bundle_sha256", "bundle_path", "url", "sha256", "size", "name", "version", "devices", "canary",
               "canary_windows", "auto_promote", "seed"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BundleError(400, f"unknown field(s) {unknown}")
    source = _source(manager, body)
    devices = body.get("devices")
    if devices is not None and (not isinstance(devices, list) or not all(isinstance(d, str) for d in devices)):
        raise BundleError(400, "'devices' must be a list of device ids")
    canary, windows, seed = body.get("canary", 1), body.get("canary_windows", 3), body.get("seed")
    if not _is_int(canary) or not _is_int(windows) or (seed is not None and not _is_int(seed)):
        raise BundleError(400, "'canary', 'canary_windows' and 'seed' must be integers")
    if not isinstance(body.get("auto_promote", False), bool):
        raise BundleError(400, "'auto_promote' must be true or false")
    return manager.create(source, devices or None, canary, windows, bool(body.get("auto_promote", False)), seed)


def _source(manager: RolloutManager, body: dict[str, Any]) -> BundleSource:
    given = [k for k in ("bundle_sha256", "bundle_path", "url") if body.get(k) is not None]
    if len(given) != 1:
        raise BundleError(400, "name the bundle by exactly one of 'bundle_sha256' (uploaded), 'bundle_path' (in "
                               "the --bundles folder) or 'url' (https:// with 'sha256', 'size', 'name', 'version')")
    if given[0] == "bundle_sha256":
        sha = body["bundle_sha256"]
        stored = manager.files.by_sha256(sha) if isinstance(sha, str) else None
        if stored is None:
            raise BundleError(404, f"no uploaded bundle {str(sha)[:16]}...: upload it first (POST /api/bundles)")
        manager.files.check_signature(stored)
        return BundleSource.stored(stored, "upload")
    if given[0] == "bundle_path":
        if not isinstance(body["bundle_path"], str):
            raise BundleError(400, "'bundle_path' must be a string")
        return BundleSource.stored(manager.files.in_folder(body["bundle_path"]), "path")
    url, sha, size, name, version = (body.get(k) for k in ("url", "sha256", "size", "name", "version"))
    if not isinstance(url, str) or not url.startswith("https://") or len(url) > 2048:
        raise BundleError(400, "'url' must be an https:// URL")
    if not isinstance(sha, str) or not SHA256.fullmatch(sha) or not _is_int(size) or size <= 0:
        raise BundleError(400, "a URL deployment needs 'sha256' (64 lowercase hex) and a positive 'size'")
    if not isinstance(name, str) or not isinstance(version, str):
        raise BundleError(400, "a URL deployment needs the bundle's 'name' and 'version'")
    # The same file in the --bundles folder tells which model it holds (so the canary can judge it).
    local = manager.files.by_sha256(sha)
    return BundleSource(sha, size, name, version, local.model_sha256 if local else None, url, "url")
