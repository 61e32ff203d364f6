"""A small HTTP client of the fleet server's API for `fleet deploy` and `fleet rollout` (stdlib urllib).

The operator token goes in `Authorization: Bearer`; writes are JSON. A server that cannot be reached
is exit 1 with a one-line message; an answer 4xx is the caller's mistake (exit 2, the server's words);
5xx is exit 1.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from edge_kit.errors import EdgeKitError, UsageError
from edge_kit.fleet.http_security import load_token

TIMEOUT = 60.0


class ServerError(EdgeKitError):
    """The fleet server failed (5xx) or could not be reached: exit 1."""


class FleetClient:
    def __init__(self, server: str, token_file: str | None) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server must be http(s)://HOST:PORT, got {server!r}")
        self.base = server.rstrip("/")
        token = load_token(token_file)
        if token is None:
            raise UsageError("an operator token is needed: --token-file PATH (or EDGEKIT_FLEET_TOKEN)")
        self.token = token

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                return json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                said = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                said = ""
            message = f"{method} {path}: the fleet server answered {exc.code}: {said or exc.reason}"
            raise (UsageError(message) if exc.code < 500 else ServerError(message)) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach the fleet server at {self.base}: {reason}") from exc


def issue_view(view: dict[str, Any]) -> dict[str, Any]:
    """The `--json` shape of a deployment: id, state, version, each device's version and state, canary figures."""
    return {"deployment": view["deployment"], "state": view["state"], "version": view["version"],
            "devices": {d: {"version": v["version"], "state": v["state"]} for d, v in view["devices"].items()},
            "canary": view["canary"]}


def describe(view: dict[str, Any]) -> str:
    """A few lines for a person: state, devices by state, the canary's verdict and failing figures."""
    lines = [f"deployment {view['deployment']}: {view['name']} {view['version']} is {view['state']}"
             + (f" ({view['note']})" if view.get("note") else "")]
    by_state: dict[str, list[str]] = {}
    for device, d in view["devices"].items():
        by_state.setdefault(f"{d['role']} {d['state']}", []).append(device)
    for state, devices in sorted(by_state.items()):
        lines.append(f"  {state}: {', '.join(devices[:10])}{' ...' if len(devices) > 10 else ''} ({len(devices)})")
    canary = view.get("canary") or {}
    if canary.get("ready"):
        verdict = "passed" if canary.get("passed") else f"FAILED on {', '.join(canary.get('failing', []))}"
        lines.append(f"  canary {verdict}")
    else:
        got = canary.get("windows") or {}
        waiting = "; ".join(canary.get("waiting_for") or []) or "the canaries"
        lines.append(f"  canary waiting for {waiting} (windows {got} of {canary.get('windows_needed', '?')} each)")
    for name, fig in (canary.get("figures") or {}).items():
        shown = {k: v for k, v in fig.items() if not isinstance(v, list | dict)}
        lines.append(f"    {name}: {json.dumps(shown)}")
    return "\n".join(lines)
