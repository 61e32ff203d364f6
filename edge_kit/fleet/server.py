"""HTTP for the fleet service (Starlette on uvicorn): the dashboard page, the JSON API, Prometheus `/metrics`.

GET  /                         dashboard (static/index.html; charts by the vendored Chart.js)
GET  /healthz                  200 when the database answers and every MQTT consumer is connected, else 503
GET  /api/devices              devices (online/offline, last seen, model) and model versions
GET  /api/drift                latest fleet results per model and channel, latest per-device flags;
                               ?model=SHA ?device=ID (that device's channels) ?channel=NAME ?history=1
GET  /api/histogram            ?model=SHA&channel=NAME[&device=ID]: reference vs current fractions
GET  /api/concept              accuracy from labels, or the marked confidence-based estimate
GET  /api/alerts               alerts with their triggers; ?format=csv exports them
POST /api/alerts/<id>/approve  run the retraining command (rate-limited); /dismiss silences it
POST /api/labels               {"device", "model_sha256", "confusion" | "true" + "pred"}
/api/deployments, /api/bundles deployments and bundle downloads (`edge_kit.fleet.deployments.routes`)
/api/captures, /api/devices/<id>/capture-request  field captures (`edge_kit.fleet.captures.routes`)
GET  /metrics                  Prometheus text format

Who may call what is decided in one place, `http_security` (operator token, Host/Origin checks,
JSON-only writes, body limits, device certificates); connection limits and timeouts in
`uvicorn_deadlines`; TLS, when configured, by `server_tls_context`. Answers are
strict JSON: a NaN or infinity anywhere becomes null, so every client's parser accepts them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge_kit.fleet.alerts import AlertError
from edge_kit.fleet.http_security import HttpSecurity, SecurityMiddleware
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.uvicorn_deadlines import protocol_class

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1024 * 1024
NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class FleetHttpLimits:
    request_timeout: float = 10.0  # a request must arrive in full within this many seconds
    keep_alive: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # beyond this the oldest idle connection is closed
    forwarded_allow_ips: str = "127.0.0.1"  # proxies whose X-Forwarded-For/-Proto are believed


def dumps(obj: Any) -> bytes:
    """Strict JSON (no NaN/Infinity tokens, which JSON does not have and browsers refuse)."""
    try:
        return json.dumps(obj, default=_default, allow_nan=False).encode()
    except ValueError:  # a non-finite float somewhere: rare, so the walk happens only then
        return json.dumps(_finite(obj), default=_default, allow_nan=False).encode()


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return None
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return _finite(obj.tolist())
    return obj


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=NO_STORE)


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(fn: Handler) -> Handler:
    """Map expected failures to 4xx; an unexpected one is logged and answered 500 without details."""

    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except AlertError as exc:
            return _error(exc.status, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        except Exception:  # one bad request must not take the server down, nor leak internals
            log.exception("%s %s failed", request.method, request.url.path)
            return _error(500, "internal error (logged on the server)")

    return wrapper


def _csv_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: one starting with = + - @ (or tab/CR) would be a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def alerts_csv(alerts: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["id", "created_at", "model_sha256", "scope", "kind", "state", "summary", "approved_by",
                "last_trigger_outcome"])
    for a in alerts:
        last = a["triggers"][-1]["outcome"] if a["triggers"] else ""
        w.writerow([_csv_cell(v) for v in (a["id"], a["created_at"], a["model_sha256"], a["scope"], a["kind"],
                                           a["state"], a["summary"], a["approved_by"] or "", last)])
    return out.getvalue()


def make_app(service: FleetService, security: HttpSecurity) -> Any:
    """The ASGI application: routes behind the security middleware."""
    s = service

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    async def healthz(request: Request) -> Response:
        health = await run_in_threadpool(s.health)
        return _json(health, 200 if health["ready"] else 503)

    async def devices(request: Request) -> Response:
        return _json(await run_in_threadpool(s.devices))

    async def drift(request: Request) -> Response:
        q = request.query_params
        return _json(await run_in_threadpool(s.drift, q.get("model"), q.get("device"), q.get("channel"),
                                             q.get("history") == "1"))

    async def histogram(request: Request) -> Response:
        q = request.query_params
        if "model" not in q or "channel" not in q:
            return _error(400, "histogram needs ?model=SHA&channel=NAME")
        h = await run_in_threadpool(s.histogram, q["model"], q["channel"], q.get("device"))
        return _json(h) if h is not None else _error(404, "unknown model or channel")

    async def concept(request: Request) -> Response:
        q = request.query_params
        return _json({"models": await run_in_threadpool(s.concept, q.get("model"), q.get("device"))})

    async def alerts(request: Request) -> Response:
        found = await run_in_threadpool(s.storage.alerts)
        if request.query_params.get("format") == "csv":
            return Response(alerts_csv(found), media_type="text/csv; charset=utf-8",
                            headers={**NO_STORE, "Content-Disposition": 'attachment; filename="alerts.csv"'})
        return _json({"alerts": found, "approval": s.settings.alerts.approval})

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(s.metrics), media_type="text/plain; version=0.0.4; charset=utf-8",
                        headers=NO_STORE)

    async def labels(request: Request) -> Response:
        body = _body(await request.body())
        if not isinstance(body, dict):
            raise ValueError("labels body must be a JSON object")
        return _json(await run_in_threadpool(s.add_labels, body))

    async def alert_action(request: Request) -> Response:
        body = _body(await request.body())
        alert_id = _alert_id(request.path_params["alert_id"])
        if request.path_params["action"] == "approve":
            by = body.get("by", "operator") if isinstance(body, dict) else "operator"
            if not isinstance(by, str) or not 0 < len(by) <= 64 or not by.isprintable():
                raise ValueError("'by' must be 1 to 64 printable characters")
            return _json(await run_in_threadpool(s.alerts.approve, alert_id, by))
        return _json(await run_in_threadpool(s.alerts.dismiss, alert_id))

    async def not_found(request: Request) -> Response:
        return _error(404, f"no such page: {request.method} {request.url.path}")

    routes = [
        Route("/", _guarded(index), methods=["GET"]),
        Route("/index.html", _guarded(index), methods=["GET"]),
        Route("/healthz", _guarded(healthz), methods=["GET"]),
        Route("/api/devices", _guarded(devices), methods=["GET"]),
        Route("/api/drift", _guarded(drift), methods=["GET"]),
        Route("/api/histogram", _guarded(histogram), methods=["GET"]),
        Route("/api/concept", _guarded(concept), methods=["GET"]),
        Route("/api/alerts", _guarded(alerts), methods=["GET"]),
        Route("/metrics", _guarded(metrics), methods=["GET"]),
        Route("/api/labels", _guarded(labels), methods=["POST"]),
        Route("/api/alerts/{alert_id}/{action:str}", _guarded(alert_action), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    if s.deployments is not None:  # this server rolls bundles out (docs/deploy.md)
        from edge_kit.fleet.deployments.routes import deployment_routes

        routes[-1:-1] = deployment_routes(s.deployments, _json, _body, _guarded)
    if s.captures is not None or s.capture_requests is not None:  # field captures (docs/captures.md)
        from edge_kit.fleet.captures.routes import capture_routes

        routes[-1:-1] = capture_routes(s.captures, s.capture_requests, _json, _body, _guarded)
    app = Starlette(routes=routes, exception_handlers={404: _handler(not_found), 405: _handler(not_found)})
    return SecurityMiddleware(app, security)


def _handler(fn: Handler) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        return await fn(request)

    return handle


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_no_constant) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"body is not JSON: {str(exc)[:200]}") from exc


def _alert_id(text: str) -> int:
    """An alert id from the path: a decimal the database can hold, else 404 (not a 500 from the driver)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # 18 digits always fit a signed int64
        raise AlertError(404, f"no alert {text[:30]!r}")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"body is not strict JSON: {name}")


def server_tls_context(certfile: str, keyfile: str | None = None, client_ca: str | None = None,
                       crl: str | None = None) -> ssl.SSLContext:
    """TLS for the HTTP listener. With `client_ca`, a client certificate is asked for but optional
    (the dashboard and operators authenticate with the token); one that is sent must chain to
    `client_ca` (and not be on `crl`), else the handshake fails. Raises ssl.SSLError / OSError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=client_ca)
        if crl is not None:
            context.load_verify_locations(cafile=crl)  # a PEM CRL loads like a certificate
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


class FleetHttpServer:
    """uvicorn serving the app on a socket bound at construction (so a busy port fails early)."""

    def __init__(self, app: Any, host: str, port: int, limits: FleetHttpLimits,
                 tls: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app, http=protocol_class(limits.request_timeout, limits.max_connections), lifespan="off",
            log_config=None, access_log=False, server_header=False, date_header=False,
            timeout_keep_alive=int(max(1, limits.keep_alive)), limit_concurrency=limits.max_connections + 1,
            proxy_headers=True, forwarded_allow_ips=limits.forwarded_allow_ips,
            h11_max_incomplete_event_size=16 * 1024, timeout_graceful_shutdown=5,
            ssl_context_factory=None if tls is None else (lambda config, default: tls),
        )
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def server_close(self) -> None:
        self.socket.close()


def make_server(service: FleetService, host: str, port: int, security: HttpSecurity | None = None,
                limits: FleetHttpLimits | None = None, tls: ssl.SSLContext | None = None) -> FleetHttpServer:
    security = security or HttpSecurity()
    if host not in ("0.0.0.0", "::", ""):  # the address it listens on is a name clients may use
        security = replace(security, allowed_hosts=security.allowed_hosts | {host})
    return FleetHttpServer(make_app(service, security), host, port, limits or FleetHttpLimits(), tls)


def serve_in_thread(server: FleetHttpServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="fleet-http", daemon=True)
    server._thread = thread
    thread.start()
    return thread
