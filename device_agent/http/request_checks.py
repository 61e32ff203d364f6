"""Checks every HTTP route applies before a request reaches the agent (its own API and /v2 alike).

A request refused here never reached the model, so it is counted with `Agent.count_bad_request`;
the agent counts what it refuses itself.
"""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.http import jsonio
from device_agent.http.protocol import HttpError, HttpLimits

MAX_REQUEST_ID = 256


class RequestChecks:
    def __init__(self, agent: Agent, limits: HttpLimits) -> None:
        self.agent = agent
        self.limits = limits

    def bad(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> HttpError:
        """An error for a request refused before it reached the agent, counted as a bad request."""
        self.agent.count_bad_request()
        return HttpError(status, message)

    def json_body(self, body: bytes | bytearray | memoryview) -> dict[str, Any]:
        try:
            doc = jsonio.loads(body) if len(body) else None
        except (UnicodeDecodeError, jsonio.DecodeError) as exc:
            raise self.bad(f"body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise self.bad("body must be a JSON object")
        return doc

    def request_id(self, value: Any) -> str | None:
        if value is None or value == "":
            return None
        rid = str(value)
        if len(rid) > MAX_REQUEST_ID:
            raise self.bad(f"request id longer than {MAX_REQUEST_ID} characters")
        return rid

    def check_samples(self, x: np.ndarray) -> None:
        """Refuse a batch over http.max_samples before it reaches the model."""
        per_sample = max(1, math.prod(self.agent.model.runtime.sample_shape))  # math.prod: np.prod costs ~5 us
        n = -(-x.size // per_sample)
        if n > self.limits.max_samples:
            raise self.bad(f"{n} samples in one request, the limit is {self.limits.max_samples} (http.max_samples)",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
