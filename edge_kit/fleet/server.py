"""HTTP for the fleet service: the dashboard page, the JSON API and Prometheus `/metrics`.

GET  /                         dashboard (static/index.html; charts by the vendored Chart.js)
GET  /api/devices              devices (online/offline, last seen, model) and model versions
GET  /api/drift                latest fleet results per model and channel, latest per-device flags;
                               ?model=SHA ?device=ID (that device's channels) ?channel=NAME ?history=1
GET  /api/histogram            ?model=SHA&channel=NAME[&device=ID]: reference vs current fractions
GET  /api/concept              accuracy from labels, or the marked confidence-based estimate
GET  /api/alerts               alerts with their triggers; ?format=csv exports them
POST /api/alerts/<id>/approve  run the retraining command (rate-limited); /dismiss silences it
POST /api/labels               {"device", "model_sha256", "confusion" | "true" + "pred"}
GET  /metrics                  Prometheus text format
GET  /healthz                  200 when every MQTT consumer is connected, else 503 (not ready)

No authentication: it listens on 127.0.0.1 by default; expose it through a reverse proxy that
authenticates operators, since approving an alert runs a command.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from edge_kit.fleet.alerts import AlertError
from edge_kit.fleet.service import FleetService

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    service: FleetService  # set on the subclass made by make_server
    server_version = "edgekit-fleet"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, default=_default).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        s = self.service
        try:
            if url.path in ("/", "/index.html"):
                self._static("index.html")
            elif url.path.startswith("/static/"):
                self._static(url.path.removeprefix("/static/"))
            elif url.path == "/api/devices":
                self._json(s.devices())
            elif url.path == "/api/drift":
                self._json(s.drift(q.get("model"), q.get("device"), q.get("channel"), q.get("history") == "1"))
            elif url.path == "/api/histogram":
                if "model" not in q or "channel" not in q:
                    self._error(400, "histogram needs ?model=SHA&channel=NAME")
                    return
                h = s.histogram(q["model"], q["channel"], q.get("device"))
                self._json(h) if h is not None else self._error(404, "unknown model or channel")
            elif url.path == "/api/concept":
                self._json({"models": s.concept(q.get("model"), q.get("device"))})
            elif url.path == "/api/alerts":
                alerts = s.storage.alerts()
                if q.get("format") == "csv":
                    self._send(200, _alerts_csv(alerts).encode(), "text/csv; charset=utf-8")
                else:
                    self._json({"alerts": alerts, "approval": s.settings.alerts.approval})
            elif url.path == "/healthz":
                ready, doc = s.health()
                self._json(doc, 200 if ready else 503)
            elif url.path == "/metrics":
                self._send(200, s.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._error(404, f"no such page: {url.path}")
        except Exception as exc:  # one bad request must not take the server down
            log.exception("GET %s failed", self.path)
            self._error(500, f"{type(exc).__name__}: {exc}")

    def do_POST(self) -> None:
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(413, f"body over {MAX_BODY} bytes")
            return
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._error(400, f"body is not JSON: {exc}")
            return
        parts = url.path.strip("/").split("/")
        try:
            if url.path == "/api/labels":
                if not isinstance(body, dict):
                    raise ValueError("labels body must be a JSON object")
                self._json(self.service.add_labels(body))
            elif len(parts) == 4 and parts[:2] == ["api", "alerts"] and parts[3] in ("approve", "dismiss"):
                alert_id = int(parts[2])
                who = str(body.get("by", "operator")) if isinstance(body, dict) else "operator"
                if parts[3] == "approve":
                    self._json(self.service.alerts.approve(alert_id, who))
                else:
                    self._json(self.service.alerts.dismiss(alert_id))
            else:
                self._error(404, f"no such endpoint: POST {url.path}")
        except AlertError as exc:
            self._error(exc.status, str(exc))
        except ValueError as exc:
            self._error(400, str(exc))
        except Exception as exc:
            log.exception("POST %s failed", self.path)
            self._error(500, f"{type(exc).__name__}: {exc}")

    def _static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if STATIC not in path.parents or not path.is_file():
            self._error(404, f"no such file: {name}")
            return
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(200, path.read_bytes(), content_type)


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return None
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _alerts_csv(alerts: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["id", "created_at", "model_sha256", "scope", "kind", "state", "summary", "approved_by",
                "last_trigger_outcome"])
    for a in alerts:
        last = a["triggers"][-1]["outcome"] if a["triggers"] else ""
        w.writerow([a["id"], a["created_at"], a["model_sha256"], a["scope"], a["kind"], a["state"], a["summary"],
                    a["approved_by"] or "", last])
    return out.getvalue()


def make_server(service: FleetService, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("FleetHandler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="fleet-http", daemon=True)
    thread.start()
    return thread
