"""Capture uploads against a real `edge-kit fleet serve` (with a real Mosquitto): devices upload with their
device token, every record is stored once (a replayed batch is all duplicates, also after the server was
killed with SIGKILL and started again on the same database and folder), the export pages through every
record once in stored order with the inputs as sent, counts add up, hostile bodies are refused as a whole
(400/413/415) or record by record with a reason, and the quota answers 507 without touching what is stored."""

from __future__ import annotations

import base64
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_kit.fleet.device_tokens import create_device_key, device_token
from harness.fleetkit import DigitsBundle, make_bundle
from harness.processes import MosquittoBroker, run_cli
from tests.edge_kit.fleet.captures_kit import (
    LABELS_PATH,
    UPLOAD,
    FleetServe,
    batch,
    call,
    device_headers,
    export_all,
    input_array,
    operator,
    record,
    status_for_declared_length,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Env:
    tmp: Path
    bundle: DigitsBundle
    key_file: Path
    key: bytes
    broker: MosquittoBroker

    def headers(self, device: str) -> dict[str, str]:
        return device_headers(device, device_token(self.key, device))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("captures")
    (tmp / "bundles").mkdir()
    (tmp / "broker").mkdir()
    bundle = make_bundle(tmp / "bundles")
    key_file = tmp / "device-token.key"
    key = create_device_key(key_file)
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    try:
        yield Env(tmp, bundle, key_file, key, broker)
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def served(env: Env) -> Iterator[FleetServe]:
    """One server for the credential and hostile-body tests (reads open to loopback, but not the export)."""
    work = env.tmp / "served"
    work.mkdir()
    server = FleetServe(work, env.broker.url, env.bundle.path.parent, "--device-key-file", str(env.key_file),
                        "--open-reads", "--captures", str(work / "store"))
    try:
        yield server
    finally:
        server.stop()


def _upload(env: Env, server: FleetServe, device: str, records: list[Any]) -> tuple[int, Any]:
    return call(server.url + UPLOAD, "POST", batch(device, records), env.headers(device))


def _counts(server: FleetServe) -> dict[tuple[str, str], dict[str, Any]]:
    status, body = call(server.url + "/api/captures/counts", headers=operator())
    assert status == 200, body
    return {(c["device"], c["model_version"]): c for c in body["counts"]}


def _metrics(server: FleetServe) -> str:
    import urllib.request

    request = urllib.request.Request(server.url + "/metrics", headers=operator())
    with urllib.request.urlopen(request, timeout=30) as r:
        return str(r.read().decode())


def test_uploads_are_stored_once_exported_in_order_and_survive_a_crash(env: Env) -> None:
    rng = np.random.default_rng(1)
    work = env.tmp / "crash"
    work.mkdir()
    store = work / "store"
    server = FleetServe(work, env.broker.url, env.bundle.path.parent, "--device-key-file", str(env.key_file),
                        "--captures", f"file://{store}")
    try:
        first = [record(env.bundle, rng, row=i, label=("3" if i < 3 else None)) for i in range(20)]
        assert _upload(env, server, "dev1", first) == (200, {"stored": 20, "duplicates": 0, "rejected": []})
        # The answer was lost: the agent sends the same batch again. Stored once.
        assert _upload(env, server, "dev1", first) == (200, {"stored": 0, "duplicates": 20, "rejected": []})
        more = [record(env.bundle, rng, row=i) for i in range(5)]
        assert _upload(env, server, "dev1", first[:5] + more) == (200, {"stored": 5, "duplicates": 5,
                                                                         "rejected": []})
        other = [record(env.bundle, rng, label="7") for _ in range(4)]
        assert _upload(env, server, "dev2", other)[1]["stored"] == 4

        counts = _counts(server)
        assert counts[("dev1", "1.0.0")] | {"last_stored": 0} == {
            "device": "dev1", "model_sha256": env.bundle.sha256, "model_version": "1.0.0", "model_name": "digits",
            "held": 25, "labelled": 3, "bytes": 25 * 256, "last_stored": 0}
        assert (counts[("dev2", "1.0.0")]["held"], counts[("dev2", "1.0.0")]["labelled"]) == (4, 4)
        shards = sorted(store.glob("dev1/*/*.npz"))
        assert len(shards) == 2 and not list(store.rglob("*.tmp"))  # one immutable file per batch with new rows

        sent = {r["id"]: r for r in first + more + other}
        exported = export_all(server.url)
        assert [r["id"] for r in exported] == [r["id"] for r in sorted(
            exported, key=lambda r: (r["stored_at"], r["id"]))]
        assert sorted(r["id"] for r in exported) == sorted(sent)  # every record once
        for rec in exported:
            want = sent[rec["id"]]
            assert rec["input"] == want["input"] and rec["output"] == want["output"]
            assert (rec["label"], rec["predicted"], rec["row"]) == (want["label"], want["predicted"], want["row"])
            assert rec["device"] == ("dev2" if want in other else "dev1")
        assert np.array_equal(input_array(exported[0]).shape, (1, 8, 8))
        assert {r["id"] for r in export_all(server.url, "devices=dev2")} == {r["id"] for r in other}
        assert len(export_all(server.url, "labelled_only=1", limit=2)) == 7
        assert export_all(server.url, f"since={max(r['created'] for r in sent.values()) + 1}") == []

        # Labels for records already uploaded: only dev1's own records change; others' ids count as unknown.
        update = {"schema": "edgekit.capture_labels/1", "device": "dev1",
                  "labels": [{"id": first[10]["id"], "label": "5"}, {"id": first[11]["id"], "label": "6"},
                             {"id": "f" * 32, "label": "1"}, {"id": other[0]["id"], "label": "1"}]}
        status, body = call(server.url + LABELS_PATH, "POST", update, env.headers("dev1"))
        assert (status, body["updated"], body["unknown"]) == (200, 2, 2)
        labels = {r["id"]: (r["label"], r["label_source"]) for r in export_all(server.url)}
        assert labels[first[10]["id"]] == ("5", "device") and labels[other[0]["id"]] == ("7", "device")
        assert _counts(server)[("dev1", "1.0.0")]["labelled"] == 5
        status, devices = call(server.url + "/api/devices", headers=operator())
        assert status == 200 and {c["device"] for c in devices["captures"]} == {"dev1", "dev2"}
        metrics = _metrics(server)
        assert 'edgekit_fleet_captures{state="held"} 29' in metrics
        assert 'edgekit_fleet_captures{state="labelled"} 9' in metrics

        server.stop(signal.SIGKILL)  # a crash: no shutdown of any kind
        server.start()
        assert sorted(r["id"] for r in export_all(server.url)) == sorted(sent)
        assert _upload(env, server, "dev1", first) == (200, {"stored": 0, "duplicates": 20, "rejected": []})
        assert _counts(server)[("dev1", "1.0.0")]["held"] == 25
    finally:
        server.stop()


def test_device_routes_take_only_the_devices_own_credential(env: Env, served: FleetServe) -> None:
    rng = np.random.default_rng(2)
    url = served.url + UPLOAD
    recs = [record(env.bundle, rng) for _ in range(3)]
    good = env.headers("dev1")
    cases = [
        ({}, 401),  # nothing
        ({"X-Edgekit-Device": "dev1"}, 401),  # no token
        (device_headers("dev1", "0" * 64), 401),  # a wrong token
        (device_headers("dev1", device_token(env.key, "dev2")), 401),  # dev2's token for dev1
        ({"Authorization": good["Authorization"]}, 401),  # the token without the device it belongs to
        (operator(), 401),  # the operator token is never a device credential
        ({**operator(), "X-Edgekit-Device": "dev1"}, 401),
    ]
    for headers, want in cases:
        status, body = call(url, "POST", batch("dev1", recs), headers)
        assert status == want, (headers, body)
    # dev1's valid credential, but the batch says it is dev2's records: 403, as for label updates.
    assert call(url, "POST", batch("dev2", recs), good)[0] == 403
    status, _ = call(served.url + LABELS_PATH, "POST", {"schema": "edgekit.capture_labels/1", "device": "dev2",
                                                        "labels": []}, good)
    assert status == 403
    assert ("dev1", "1.0.0") not in _counts(served)  # nothing of the above was stored
    status, body = call(url, "POST", batch("dev1", recs), good)
    assert (status, body["stored"]) == (200, 3)
    # --open-reads lets loopback read the counts, never the export (it holds the devices' inputs).
    assert call(served.url + "/api/captures/counts")[0] == 200
    assert call(served.url + "/api/captures")[0] == 401
    assert call(served.url + "/api/captures", headers=operator())[0] == 200
    # Operator route: a capture request needs the operator token, not a device's.
    assert call(served.url + "/api/devices/dev1/capture-request", "POST", {"samples": 5}, good)[0] == 401


def _f32(values: list[float]) -> str:
    return base64.b64encode(struct.pack("<64f", *values)).decode()


def test_hostile_bodies_are_refused_whole_or_record_by_record(env: Env, served: FleetServe) -> None:
    rng = np.random.default_rng(3)
    url, headers = served.url + UPLOAD, env.headers("dev3")
    ok = record(env.bundle, rng)
    whole = [
        (b"not json", 400), (b"[1, 2]", 400), (b'{"schema": "edgekit.captures/1", "device": "dev3", "records": [NaN]}',
                                              400),
        (b"[" * 50_000, 400),
        (b'{"schema": "edgekit.captures/9", "device": "dev3", "records": []}', 400),
        (b'{"schema": "edgekit.captures/1", "device": 3, "records": []}', 400),
        (b'{"schema": "edgekit.captures/1", "device": "dev3", "records": {}}', 400),
        (b'{"schema": "edgekit.captures/1", "device": "dev3", "records": [' + b",".join([b"{}"] * 1001) + b"]}", 400),
    ]
    for raw, want in whole:
        status, body = call(url, "POST", headers=headers, raw=raw)
        assert status == want, (raw[:60], body)
    # Past the device routes' 4 MiB body limit: 413 (a little over the other routes' 1 MiB is fine here).
    assert status_for_declared_length(served.port, UPLOAD, headers, 4 * 1024 * 1024 + 1) == 413
    assert status_for_declared_length(served.port, "/api/labels", operator(), 1024 * 1024 + 1) == 413
    padded = batch("dev3", []) | {"pad": "x" * (2 * 1024 * 1024)}
    assert call(url, "POST", padded, headers)[0] == 200
    assert call(url, "POST", headers={**headers, "Content-Type": "text/plain"}, raw=b"{}")[0] == 415

    dup = record(env.bundle, rng)
    bad: list[tuple[Any, str]] = [
        (7, "JSON object"),
        (record(env.bundle, rng, id="xyz"), "'id'"),
        (record(env.bundle, rng, id="A" * 32), "'id'"),
        (record(env.bundle, rng, model_sha256="0" * 64), "unknown model"),
        (record(env.bundle, rng, model_sha256="not-a-sha"), "'model_sha256'"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, 8], "data": "!" * 344}), "base64"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, 8],
                                        "data": base64.b64encode(b"\0" * 255).decode()}), "256 bytes"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, 8], "data": _f32([float("nan")] * 64)}),
         "finite"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, 8],
                                        "data": _f32([0.0] * 63 + [float("inf")])}), "finite"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, 8000000000000], "data": ""}), "shape"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [64], "data": _f32([0.0] * 64)}), "shape"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, True], "data": _f32([0.0] * 64)}),
         "shape"),
        (record(env.bundle, rng, input={"dtype": "float64", "shape": [1, 8, 8],
                                        "data": base64.b64encode(b"\0" * 512).decode()}), "dtype"),
        (record(env.bundle, rng, input=[1, 2]), "'input'"),
        (record(env.bundle, rng, input={"dtype": "float32", "shape": [1, 8, 8], "data": 5}), "base64"),
        (record(env.bundle, rng, label="cat"), "class names"),
        (record(env.bundle, rng, label=3), "class names"),
        (record(env.bundle, rng, output=[0.0] * 9), "10 numbers"),
        (record(env.bundle, rng, output=["a"] * 10), "finite"),
        (record(env.bundle, rng, output=[10**400] * 10), "finite"),
        (record(env.bundle, rng, predicted=10), "class index"),
        (record(env.bundle, rng, predicted=True), "class index"),
        (record(env.bundle, rng, created="yesterday"), "'created'"),
        (record(env.bundle, rng, created=1e300), "'created'"),
        (record(env.bundle, rng, window_start=None), "'window_start'"),
        (record(env.bundle, rng, row=-1), "'row'"),
        (record(env.bundle, rng, request_id="r" * 500), "'request_id'"),
        (dup, "repeated"), (dict(dup), "repeated"),
    ]
    status, body = call(url, "POST", batch("dev3", [ok] + [b for b, _ in bad]), headers)
    assert status == 200, body
    assert body["stored"] == 1 and body["duplicates"] == 0
    assert len(body["rejected"]) == len(bad)
    for (_, words), got in zip(bad, body["rejected"], strict=True):
        assert words in got["reason"], (words, got)
    exported = export_all(served.url, "devices=dev3")
    assert [r["id"] for r in exported] == [ok["id"]]


def test_the_quota_answers_507_and_keeps_what_is_stored(env: Env) -> None:
    rng = np.random.default_rng(4)
    work = env.tmp / "quota"
    work.mkdir()
    server = FleetServe(work, env.broker.url, env.bundle.path.parent, "--device-key-file", str(env.key_file),
                        "--captures-max-bytes", "60000")  # the default store: captures/ beside the SQLite file
    try:
        sent: dict[str, dict[str, Any]] = {}
        refused = None
        for _ in range(20):
            recs = [record(env.bundle, rng) for _ in range(20)]
            status, body = _upload(env, server, "dev1", recs)
            if status == 507:
                refused = recs
                assert body["error"] == "capture store full" and "--captures-max-bytes" in body["detail"]
                break
            assert status == 200 and body["stored"] == 20
            sent.update((r["id"], r) for r in recs)
        assert refused is not None and sent, "the quota never filled"
        assert (work / "captures").is_dir()
        held = _counts(server)[("dev1", "1.0.0")]["held"]
        assert held == len(sent)
        assert _upload(env, server, "dev1", refused)[0] == 507  # the device keeps it and retries: still full
        exported = export_all(server.url, limit=50)
        assert {r["id"]: r["input"] for r in exported} == {i: r["input"] for i, r in sent.items()}
        assert not list((work / "captures").rglob("*.tmp"))
        # Replays of stored records need no room: they are duplicates, never a 507.
        some = list(sent.values())[:5]
        assert _upload(env, server, "dev1", some) == (200, {"stored": 0, "duplicates": 5, "rejected": []})
    finally:
        server.stop()


def test_without_device_credentials_uploads_are_403_and_postgres_needs_captures_named(env: Env) -> None:
    work = env.tmp / "nocreds"
    work.mkdir()
    server = FleetServe(work, env.broker.url, env.bundle.path.parent)
    try:
        rng = np.random.default_rng(5)
        status, body = call(server.url + UPLOAD, "POST", batch("dev1", [record(env.bundle, rng)]),
                            env.headers("dev1"))
        assert (status, body["error"]) == (403, "capture uploads need device credentials")
    finally:
        server.stop()
    r = run_cli("edge_kit", "fleet", "serve", "--broker", env.broker.url, "--db", "postgresql://nobody@127.0.0.1:1/x",
                "--http", "127.0.0.1:0", "--bundles", str(env.bundle.path.parent), "--json", timeout=120)
    assert r.returncode == 2 and "--captures" in r.json()["error"], (r.stdout, r.stderr)
