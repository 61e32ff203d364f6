"""Property-based tests (bounded): the summary decoder + validator, the status validator and the fleet HTTP
request handling. No input escapes as an unexpected exception, answers 500, or is stored unchecked."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.errors import PayloadError
from edge_kit.fleet.http_security import HttpSecurity
from edge_kit.fleet.ingest import Validator
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.server import make_app
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import OPERATOR_TOKEN, DigitsBundle, sample_images, summary

BOUNDED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])

# JSON values a broken or hostile device could send, including what Python's json module makes of
# NaN, huge numbers and "\ud800" escapes.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["\x00", "\ud800", "a" * 300, "", "online", "offline"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, digits_bundle: DigitsBundle) -> tuple[Validator, Storage, dict]:
    storage = Storage(f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/fleet.db")
    validator = Validator(ReferenceStore([digits_bundle.path]), parse_settings({}).ingest)
    x, y = sample_images(30, np.random.default_rng(0))
    data, _ = summary(digits_bundle, "dev0", time.time() - 600, x, y=y).to_bytes(compress=False)
    return validator, storage, json.loads(data)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _store_or_reject(validator: Validator, storage: Storage, raw: bytes, content_type: str | None) -> None:
    try:
        row = validator.summary("edgekit/test/dev0/summary", raw, content_type)
    except PayloadError:
        return
    storage.ingest([row], [], {})  # accepted: it must be storable (raises on anything unchecked)
    assert 0 <= row.seq < 2**63 and 0 <= row.n < 2**63


@BOUNDED
@given(data=st.data())
def test_summary_validator_rejects_or_stores_every_mutation(world: tuple[Validator, Storage, dict],
                                                            data: st.DataObject) -> None:
    validator, storage, good = world
    payload = json.loads(json.dumps(good))
    path = data.draw(st.sampled_from(_paths(payload)[1:]))
    target = payload
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(json_values)
    raw = json.dumps(payload).encode()  # Python's json writes NaN/Infinity and lone surrogates as escapes
    _store_or_reject(validator, storage, raw, "application/json")


@BOUNDED
@given(raw=st.binary(max_size=300), content_type=st.sampled_from([None, "application/json", "application/json+zlib",
                                                                   "text/plain"]))
def test_summary_validator_survives_arbitrary_bytes(world: tuple[Validator, Storage, dict], raw: bytes,
                                                    content_type: str | None) -> None:
    validator, storage, _ = world
    _store_or_reject(validator, storage, raw, content_type)


@BOUNDED
@given(body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                      st.dictionaries(st.text(max_size=8), json_values, max_size=4).map(
                          lambda d: json.dumps({"state": "online", **d}).encode())))
def test_status_validator_accepts_only_storable_json(world: tuple[Validator, Storage, dict], body: bytes) -> None:
    _, storage, _ = world
    try:
        status = Validator.status("edgekit/test/dev0/status", body)
    except PayloadError:
        return
    json.dumps(status["status"], allow_nan=False)  # what the API serves back is strict JSON
    storage.ingest([], [status], {})


ROUTES = ["/", "/healthz", "/api/devices", "/api/alerts", "/api/alerts?format=csv", "/metrics", "/api/labels",
          "/api/alerts/1/approve", "/api/alerts/1/dismiss", "/api/alerts/x/approve", "/api/drift?model=%00",
          "/api/histogram?model=a&channel=b", "/static/../server.py", "/nope"]
header_names = st.sampled_from([b"host", b"origin", b"content-type", b"authorization", b"content-length",
                                b"transfer-encoding", b"x-forwarded-for", b"cookie"])
header_values = st.one_of(st.binary(max_size=40), st.sampled_from([
    b"127.0.0.1", b"evil.example", b"application/json", b"text/plain", f"Bearer {OPERATOR_TOKEN}".encode(),
    b"Bearer x", b"-1", b"0", b"5", b"chunked", b"http://evil.example", b"http://127.0.0.1"]))


def _call(app: Any, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    path, _, query = target.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    asyncio.run(app(scope, receive, send))
    return status[0]


@BOUNDED
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]), target=st.sampled_from(ROUTES),
       headers=st.lists(st.tuples(header_names, header_values), max_size=6),
       body=st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode())))
def test_http_requests_never_500_and_never_change_state_unauthorised(light_service: FleetService, method: str,
                                                                     target: str, headers: list, body: bytes) -> None:
    service = light_service
    app = _app(service)
    before = [(a["id"], a["state"]) for a in service.storage.alerts()]
    status = _call(app, method, target, [(b"host", b"127.0.0.1"), *headers] if not any(
        h == b"host" for h, _ in headers) else headers, body)
    assert status < 500 or status == 503, status
    authorised = (f"Bearer {OPERATOR_TOKEN}".encode() in [v for h, v in headers if h == b"authorization"])
    if not authorised:
        assert [(a["id"], a["state"]) for a in service.storage.alerts()] == before


@pytest.fixture(scope="module")
def light_service(world: tuple[Validator, Storage, dict], digits_bundle: DigitsBundle) -> FleetService:
    """A service over the fuzz database with one pending alert (no drift evaluation needed)."""
    _, storage, _ = world
    svc = FleetService(storage, ReferenceStore([digits_bundle.path]), parse_settings({}))
    storage.create_alert(digits_bundle.sha256, "fleet", "data_drift", "pending_approval", "fuzz", {})
    return svc


_APPS: dict[int, Any] = {}


def _app(service: FleetService) -> Any:
    key = id(service)
    if key not in _APPS:
        _APPS.clear()
        _APPS[key] = make_app(service, HttpSecurity(token=OPERATOR_TOKEN, open_reads=True))
    return _APPS[key]
