"""Capture requests: an operator (or an approved alert) asks a device for its next N predicted rows.

Each request is stored (`capture_requests`), then published retained, QoS 1, on the device's `capture`
topic. What each topic must say (the device's newest request) comes from the database, so the
publisher sends all of it again on every (re)connect to the broker, as deployments do; the agent acts
on a request id once, so a message seen twice asks for nothing more.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any, Protocol

import sqlalchemy as sa

from device_agent.uplink.wire import capture_topic, topic_level_problem
from edge_kit.fleet import tables as t
from edge_kit.fleet.captures.validation import CaptureError
from edge_kit.fleet.storage import Storage

log = logging.getLogger(__name__)
SCHEMA = "edgekit.capture_request/1"
MAX_SAMPLES = 100_000
MAX_REASON = 500
r = t.capture_requests.c


class Publisher(Protocol):
    def publish(self, messages: Sequence[tuple[str, bytes]]) -> None: ...


class CaptureRequests:
    """Stores capture requests of one fleet and hands them to the publisher."""

    def __init__(self, storage: Storage, fleet: str) -> None:
        self.database = storage.database
        self.fleet = fleet
        self.publisher: Publisher | None = None

    def create(self, device: str, samples: Any, reason: Any = "") -> dict[str, Any]:
        """Store a request and publish it; the message as published. CaptureError 400 on bad input."""
        problem = topic_level_problem(device) if isinstance(device, str) else "not a string"
        if problem is not None or not device or len(device) > 128:
            raise CaptureError(400, f"not a device id: {str(device)[:40]!r} ({problem or 'length'})")
        if type(samples) is not int or not 1 <= samples <= MAX_SAMPLES:
            raise CaptureError(400, f"'samples' must be an integer from 1 to {MAX_SAMPLES}")
        if not isinstance(reason, str) or len(reason) > MAX_REASON or not reason.replace("\n", " ").isprintable():
            raise CaptureError(400, f"'reason' must be printable text of at most {MAX_REASON} characters")
        row = {"id": secrets.token_hex(16), "fleet": self.fleet, "device": device, "samples": samples,
               "reason": reason, "created": time.time()}
        with self.database.write() as conn:
            conn.execute(sa.insert(t.capture_requests), row)
        message = _message(row)
        if self.publisher is not None:
            self.publisher.publish([(capture_topic(self.fleet, device), _payload(message))])
        log.info("capture request %s: %d sample(s) from %s (%s)", row["id"], samples, device, reason or "no reason")
        return message

    def latest(self) -> list[dict[str, Any]]:
        """The newest request per device of this fleet (what its retained topic must say)."""
        query = sa.select(*t.capture_requests.c).where(r.fleet == self.fleet).order_by(r.created, r.id)
        with self.database.read() as conn:
            newest = {str(row.device): dict(row._mapping) for row in conn.execute(query)}
        return [_message(row) for row in newest.values()]

    def messages(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of every device's newest request: the publisher's republish on connect."""
        return [(capture_topic(self.fleet, m["device"]), _payload(m)) for m in self.latest()]


def _message(row: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "request": row["id"], "fleet": row["fleet"], "device": row["device"],
            "samples": int(row["samples"]), "created": float(row["created"]), "reason": row["reason"]}


def _payload(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()
