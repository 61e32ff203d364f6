"""The fleet's request for more samples: `edgekit.capture_request/1`, retained on `edgekit/<fleet>/<device>/capture`.

    {"schema": "edgekit.capture_request/1", "request": "<id>", "fleet": "demo", "device": "dev-4",
     "samples": 500, "created": 1765000000.0, "reason": "data drift alert 7"}

One definition for both sides: the fleet builds payloads with `encode_capture_request`, the agent reads
them with `parse_capture_request`. Anything on the topic is hostile until checked: not JSON, not an
object, another schema, another fleet or device, a sample count that is not an integer in
1..100,000 (huge numbers included), an id that is not a short token, an oversized payload: each a
`PayloadError` whose `kind` the agent counts, and the message is ignored. Fields beyond these are
ignored, so the fleet may add some. An empty retained payload means the topic was cleared.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from device_agent.errors import PayloadError

SCHEMA = "edgekit.capture_request/1"
MAX_MESSAGE_BYTES = 8 * 1024  # a request is ~200 bytes
MAX_SAMPLES = 100_000
MAX_REASON_CHARS = 500
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class CaptureRequest:
    request: str
    fleet: str
    device: str
    samples: int
    created: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "request": self.request, "fleet": self.fleet, "device": self.device,
                "samples": self.samples, "created": self.created, "reason": self.reason}


def encode_capture_request(request: CaptureRequest) -> bytes:
    """The payload the fleet publishes (retained, QoS 1); `parse_capture_request` reads it back."""
    payload = json.dumps(request.as_dict(), allow_nan=False).encode()
    parse_capture_request(payload, fleet=request.fleet, device=request.device)  # never publish what we refuse
    return payload


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_capture_request(payload: bytes, *, fleet: str, device: str) -> CaptureRequest:
    """Check a message for this device; PayloadError (with `kind`) for anything that is not one."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise PayloadError("too_large", f"{len(payload)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PayloadError("not_json", str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise PayloadError("not_object", f"a JSON {type(doc).__name__}, not an object")
    if doc.get("schema") != SCHEMA:
        raise PayloadError("schema", f"schema {str(doc.get('schema'))[:64]!r}, not {SCHEMA!r}")
    request = doc.get("request")
    if not isinstance(request, str) or not _ID.fullmatch(request):
        raise PayloadError("bad_request_id", f"request {str(request)[:64]!r} is not a short id")
    if doc.get("fleet") != fleet or doc.get("device") != device:
        raise PayloadError("wrong_device", f"for {str(doc.get('fleet'))[:64]}/{str(doc.get('device'))[:64]}, "
                                           f"not {fleet}/{device}")
    samples = doc.get("samples")
    if type(samples) is not int or not 1 <= samples <= MAX_SAMPLES:
        raise PayloadError("bad_samples", f"samples {str(samples)[:32]!r} is not an integer in 1..{MAX_SAMPLES}")
    created = doc.get("created")
    if not isinstance(created, int | float) or isinstance(created, bool) or not math.isfinite(created) or created < 0:
        raise PayloadError("bad_created", f"created {str(created)[:32]!r} is not a unix time")
    reason = doc.get("reason", "")
    if not isinstance(reason, str):
        raise PayloadError("bad_reason", "reason is not a string")
    return CaptureRequest(request, fleet, device, samples, float(created), reason[:MAX_REASON_CHARS])
