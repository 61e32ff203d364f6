"""A small local HTTP server standing in for the fleet's capture routes, scripted answer by answer: the
capture tests' view of what the agent sends and how it reacts to each status (the real `fleet serve` is
tests/edge_kit/fleet/test_captures_*.py's)."""

from __future__ import annotations

import json
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DROP = "drop"  # close the connection after reading the request, without an answer (a crashed fleet)
STORED_THEN_CRASH = "stored-then-crash"  # store the batch, then close without an answer


class FleetDouble:
    """Answers device routes like the fleet (ids stored once), or as scripted, one action per request."""

    def __init__(self) -> None:
        self.script: deque[Any] = deque()
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.stored: dict[str, dict[str, Any]] = {}
        self.labels: dict[str, str] = {}
        self.reject: set[str] = set()
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                double.requests.append((self.path, dict(self.headers.items()), body))
                action = double.script.popleft() if double.script else None
                if action in (DROP, STORED_THEN_CRASH):
                    if action == STORED_THEN_CRASH:
                        double.take(body)
                    self.close_connection = True
                    return
                if action is not None:
                    status, payload = action
                    self.answer(status, payload)
                elif self.path == "/api/captures/upload":
                    self.answer(200, double.take(body))
                elif self.path == "/api/captures/labels":
                    known = [item for item in body["labels"] if item["id"] in double.stored]
                    double.labels.update({item["id"]: item["label"] for item in known})
                    self.answer(200, {"updated": len(known), "unknown": len(body["labels"]) - len(known)})
                else:
                    self.answer(404, {"error": "no route"})

            def answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, body: dict[str, Any]) -> dict[str, Any]:
        stored = duplicates = 0
        rejected = []
        for record in body["records"]:
            if record["id"] in self.reject:
                rejected.append({"id": record["id"], "reason": "model_sha256 unknown"})
            elif record["id"] in self.stored:
                duplicates += 1
            else:
                self.stored[record["id"]] = record
                stored += 1
        return {"stored": stored, "duplicates": duplicates, "rejected": rejected}

    def uploads(self) -> list[dict[str, Any]]:
        return [body for path, _, body in self.requests if path == "/api/captures/upload"]
