"""Deployments in one process: the canary decision on simulated devices' windows and statuses, the
state machine, the retained messages it derives, bundle downloads (Range, ETag, caps) and uploads."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.deploy.message import parse_deployment_message
from device_agent.uplink.wire import deployment_topic
from edge_kit.fleet.alerts import AlertManager
from edge_kit.fleet.deployments.bundles import BundleError, BundleFiles, file_sha256
from edge_kit.fleet.deployments.rollout import RolloutManager
from edge_kit.fleet.http_security import HttpSecurity
from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.server import make_server, serve_in_thread
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import OPERATOR_TOKEN, make_bundle
from tests.helpers.deploykit import DEVICES, FLEET, Fleet, bundle_source, deploy_fleet, install, report, status, window


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with deploy_fleet(tmp_path) as f:
        yield f


def _canaries(view: dict) -> list[str]:
    return sorted(d for d, v in view["devices"].items() if v["role"] == "canary")


def _messages(f: Fleet) -> dict[str, dict]:
    out = {}
    for topic, payload in f.manager.messages():
        device = topic.split("/")[2]
        assert topic == deployment_topic(FLEET, device)
        out[device] = parse_deployment_message(payload).to_dict() if payload else {}
    return out


def test_canary_passes_promotes_automatically_and_finishes(fleet: Fleet) -> None:
    f = fleet
    view = f.manager.create(bundle_source(f), None, canary=2, canary_windows=3, auto_promote=True, seed=1)
    dep = view["deployment"]
    assert view["state"] == "canary" and sorted(view["devices"]) == DEVICES  # default: every device seen
    canaries = _canaries(view)
    assert len(canaries) == 2
    sent = _messages(f)
    assert sorted(sent) == canaries  # control devices are told nothing yet
    v2_sha = file_sha256(f.v2.path)
    assert {m["action"] for m in sent.values()} == {"install"}
    assert sent[canaries[0]]["sha256"] == v2_sha and sent[canaries[0]]["url"] == \
        f"http://fleet.example:8080/api/bundles/{v2_sha}"

    install(f, dep, canaries, windows=2)
    f.manager.tick()
    view = f.manager.view(dep)
    assert view["state"] == "canary" and view["canary"]["ready"] is False  # 2 of 3 windows
    install(f, dep, canaries, windows=3)
    f.manager.tick()
    view = f.manager.view(dep)
    figures = view["canary"]["figures"]
    assert view["canary"]["passed"] is True, view["canary"]
    assert figures["predicted_class"]["ok"] is True and figures["predicted_class"]["p_value"] > 0.01
    assert figures["input_drift"]["ok"] is True and figures["install"]["installed"] == 2
    assert figures["requests"]["ok"] is True and figures["latency"]["ok"] is True
    assert view["state"] == "rolling"
    assert sorted(_messages(f)) == DEVICES  # promoted: the rest are told now

    rest = [d for d in DEVICES if d not in canaries]
    f.manager.tick()
    assert f.manager.view(dep)["state"] == "rolling"
    install(f, dep, rest, windows=0)
    f.manager.tick()
    view = f.manager.view(dep)
    assert view["state"] == "done"
    assert all(v["state"] == "installed" and v["version"] == "1.1.0" for v in view["devices"].values())


def test_skewed_bundle_is_rolled_back_with_an_alert_naming_the_figure(fleet: Fleet) -> None:
    f = fleet
    view = f.manager.create(bundle_source(f), DEVICES, canary=2, canary_windows=3, auto_promote=True, seed=3)
    dep, canaries = view["deployment"], _canaries(view)
    install(f, dep, canaries, skew=True)
    f.manager.tick()
    view = f.manager.view(dep)
    assert view["state"] == "rolled_back", view["canary"]
    assert view["canary"]["failing"] == ["predicted_class"]
    assert view["canary"]["figures"]["predicted_class"]["p_value"] < 1e-6
    assert view["canary"]["figures"]["input_drift"]["ok"] is True  # the inputs were fine: the model was not
    sent = _messages(f)
    assert sorted(sent) == canaries  # the control devices never saw the bad bundle
    v1_sha = file_sha256(f.v1.path)
    assert all(m["action"] == "rollback" and m["sha256"] == v1_sha and m["version"] == "1.0.0"
               for m in sent.values())
    alerts = f.storage.alerts()
    assert [(a["kind"], a["scope"]) for a in alerts] == [("canary_failed", f"deployment:{dep}")]
    assert "predicted_class" in alerts[0]["summary"] and "chi-square" in alerts[0]["summary"]
    with pytest.raises(BundleError, match="only a canary can be promoted"):
        f.manager.promote(dep)
    # The canaries' rollback reports are still recorded on the rolled-back deployment.
    f.send(*[status(f.v1, d, fleet=FLEET, deployment=report(dep, f.v1, "rolled_back", time.time()))
             for d in canaries])
    f.manager.tick()
    assert {f.manager.view(dep)["devices"][d]["state"] for d in canaries} == {"rolled_back"}


def test_a_canary_that_fails_to_install_halts_the_rollout_at_once(fleet: Fleet) -> None:
    f = fleet
    view = f.manager.create(bundle_source(f), DEVICES, canary=2, canary_windows=3, auto_promote=True, seed=5)
    dep, canaries = view["deployment"], _canaries(view)
    f.send(status(f.v1, canaries[0], fleet=FLEET,
                  deployment=report(dep, f.v2, "failed", time.time(), reason="self-test: output is NaN")))
    f.manager.tick()
    view = f.manager.view(dep)
    assert view["state"] == "rolled_back" and view["canary"]["failing"] == ["install"]
    assert view["canary"]["figures"]["install"]["reasons"] == {canaries[0]: "self-test: output is NaN"}
    assert view["devices"][canaries[0]]["state"] == "failed"
    assert sorted(_messages(f)) == canaries


def test_the_decision_waits_for_control_windows_before_passing_a_canary(tmp_path: Path) -> None:
    """Control devices with no windows of the model they serve (they just installed it): no comparison yet,
    so the canary is not passed on the figures that happen to have data."""
    folder = tmp_path / "bundles"
    folder.mkdir()
    v1, v2 = make_bundle(folder, version="1.0.0"), make_bundle(folder, version="1.1.0")
    settings = parse_settings({"drift": {"min_n": 50}})
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    try:
        references = ReferenceStore(folder=folder)
        f = Fleet(storage, Ingestor(storage, references, settings.ingest), None, None, v1, v2, folder,  # type: ignore[arg-type]
                  np.random.default_rng(0))
        f.send(*[status(v1, d, fleet=FLEET) for d in DEVICES[:3]])  # seen (status), no windows yet
        f.manager = RolloutManager(storage, settings, references, BundleFiles(folder),
                                   AlertManager(storage, settings.alerts), FLEET, "http://fleet:1")
        view = f.manager.create(bundle_source(f), None, canary=1, canary_windows=2, auto_promote=True, seed=0)
        dep, canaries = view["deployment"], _canaries(view)
        install(f, dep, canaries, windows=2, skew=True)
        f.manager.tick()
        view = f.manager.view(dep)
        assert view["state"] == "canary" and view["canary"]["ready"] is False
        assert "predicted-class" in view["canary"]["waiting_for"][0]
        now = time.time()
        f.send(*[window(v1, d, now + 1, f.rng, fleet=FLEET) for d in DEVICES[:3] if d not in canaries])
        f.manager.tick()
        view = f.manager.view(dep)
        assert view["state"] == "rolled_back" and view["canary"]["failing"] == ["predicted_class"]
    finally:
        storage.close()


def test_a_slow_canary_that_fails_requests_fails_on_those_figures(fleet: Fleet) -> None:
    f = fleet
    view = f.manager.create(bundle_source(f), DEVICES, canary=1, canary_windows=1, auto_promote=True, seed=6)
    dep, canaries = view["deployment"], _canaries(view)
    install(f, dep, canaries, windows=1)
    f.send(status(f.v2, canaries[0], fleet=FLEET, deployment=report(dep, f.v2, "installed", time.time()),
                  requests=500, failed=40, p95=30.0))
    f.manager.tick()
    view = f.manager.view(dep)
    assert view["state"] == "rolled_back" and view["canary"]["failing"] == ["requests", "latency"]
    figures = view["canary"]["figures"]
    assert figures["requests"]["canary_rate"] == 0.08 and figures["requests"]["control_rate"] == 0.002
    assert figures["latency"]["canary_p95_ms"] == 30.0 and figures["latency"]["control_p95_ms"] == 2.0
    assert "p95 30.0 ms vs control 2.0 ms" in f.storage.alerts()[0]["summary"]


def test_operator_promote_halt_and_rollback(fleet: Fleet) -> None:
    f = fleet
    view = f.manager.create(bundle_source(f), DEVICES[:4], canary=1, canary_windows=2, auto_promote=False, seed=2)
    dep, canaries = view["deployment"], _canaries(view)
    install(f, dep, canaries, windows=2)
    f.manager.tick()
    view = f.manager.view(dep)
    assert view["canary"]["passed"] is True and view["state"] == "canary"  # waits for the operator
    with pytest.raises(BundleError, match="already in active deployment"):
        f.manager.create(bundle_source(f), DEVICES[3:], canary=1, canary_windows=2, auto_promote=False)
    assert f.manager.promote(dep)["state"] == "rolling"
    view = f.manager.halt(dep)
    assert view["state"] == "halted"
    sent = _messages(f)
    assert sent[canaries[0]]["action"] == "install"  # installed: keeps it
    assert all(sent[d] == {} for d in DEVICES[:4] if d not in canaries)  # not installed yet: topic cleared
    view = f.manager.rollback(dep)
    assert view["state"] == "rolled_back"
    assert _messages(f)[canaries[0]]["action"] == "rollback"
    with pytest.raises(BundleError, match="already rolled back"):
        f.manager.rollback(dep)


def test_state_survives_a_new_manager_on_the_same_database(fleet: Fleet, tmp_path: Path) -> None:
    """What `fleet serve` does after a restart: a new process, the same database, the rollout goes on."""
    f = fleet
    view = f.manager.create(bundle_source(f), DEVICES, canary=1, canary_windows=1, auto_promote=True, seed=4)
    dep, canaries = view["deployment"], _canaries(view)
    before = f.manager.messages()
    storage = Storage(f.storage.database.url)
    try:
        again = RolloutManager(storage, f.service.settings, f.service.references, BundleFiles(f.folder),
                               AlertManager(storage, f.service.settings.alerts), FLEET, "http://fleet.example:8080")
        assert again.messages() == before  # the same retained messages, byte for byte
        install(f, dep, canaries, windows=1)
        again.tick()
        assert again.view(dep)["state"] == "rolling"
    finally:
        storage.close()


def test_bad_requests_are_refused(fleet: Fleet) -> None:
    f = fleet
    with pytest.raises(BundleError, match="canary must be 1 to 6"):
        f.manager.create(bundle_source(f), None, canary=7, canary_windows=1, auto_promote=False)
    with pytest.raises(BundleError, match="cannot be an MQTT topic level"):
        f.manager.create(bundle_source(f), ["a/b"], canary=1, canary_windows=1, auto_promote=False)
    with pytest.raises(BundleError, match="inside the --bundles folder"):
        f.manager.files.in_folder("../fleet.db")
    with pytest.raises(BundleError, match="no deployment"):
        f.manager.view("nope")


def test_a_database_of_the_previous_schema_is_upgraded_with_its_data(tmp_path: Path) -> None:
    """A fleet database at revision 0002 (no deployment tables) gains them on start and keeps its windows."""
    import sqlalchemy as sa
    from alembic import command

    from edge_kit.fleet import migrations
    from edge_kit.fleet.deployments.store import DeploymentStore, Previous

    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrations._config(conn), "0002")
        conn.execute(sa.text("INSERT INTO windows VALUES ('dev0', 'ab', 1.0, 2.0, 0, 5, 'f', 'digits', '1.0.0', "
                             "3.0, x'00', NULL)"))
    with engine.connect() as conn:
        assert migrations.current_revision(conn) == "0002"
        assert not sa.inspect(conn).has_table("deployments")
    engine.dispose()
    storage = Storage(url)
    try:
        assert storage.schema_revision == migrations.head_revision() >= "0003"
        assert storage.window_count() == 1
        store = DeploymentStore(storage)
        row = {"id": "d1", "fleet": "f", "state": "canary", "name": "digits", "version": "1.1.0",
               "bundle_sha256": "cd" * 32, "model_sha256": "ef", "size": 10, "url": None, "source": "path",
               "canary_n": 1, "canary_windows": 2, "auto_promote": True, "seed": 3}
        store.create(row, [("dev0", "canary", Previous("ab" * 32, "digits", "1.0.0", "ab"))])
        assert store.get("d1")["auto_promote"] is True  # type: ignore[index]
        assert [d["previous_version"] for d in store.devices("d1")] == ["1.0.0"]
    finally:
        storage.close()


# -- HTTP --------------------------------------------------------------------------------------


@pytest.fixture
def http(fleet: Fleet) -> Iterator[str]:
    server = make_server(fleet.service, "127.0.0.1", 0, HttpSecurity(token=OPERATOR_TOKEN))
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}, method=method),
                                    timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _post(url: str, body: dict, token: str | None = OPERATOR_TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bundle_download_ranges_etag_and_caps(fleet: Fleet, http: str) -> None:
    data = fleet.v2.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    url = f"{http}/api/bundles/{sha}"
    code, headers, body = _get(url)  # no operator token: devices have none
    assert code == 200 and body == data and headers["etag"] == f'"{sha}"' and headers["accept-ranges"] == "bytes"
    code, headers, body = _get(url, {"Range": "bytes=100-"})
    assert code == 206 and body == data[100:] and headers["content-range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    code, _, body = _get(url, {"Range": "bytes=100-", "If-Range": '"' + "0" * 64 + '"'})
    assert code == 200 and body == data  # the file changed under the device: start again
    code, headers, _ = _get(url, {"Range": f"bytes={len(data)}-"})
    assert code == 416 and headers["content-range"] == f"bytes */{len(data)}"
    code, headers, body = _get(url, method="HEAD")
    assert code == 200 and body == b"" and int(headers["content-length"]) == len(data)
    assert _get(f"{http}/api/bundles/{'1' * 64}")[0] == 404

    # Concurrency cap (1 here): a download in progress holds the slot; the next is told to come back.
    slots = fleet.manager.download_slots
    assert slots.acquire()
    try:
        code, headers, _ = _get(url)
        assert code == 503 and headers["retry-after"] == "5"
    finally:
        slots.release()
    metrics = fleet.service.metrics()
    assert "edgekit_fleet_bundle_downloads_refused_total 1\n" in metrics
    assert "edgekit_fleet_bundle_downloads 0\n" in metrics

    # Per-device cap (1 x the size here) for a device the deployment targets.
    view = fleet.manager.create(bundle_source(fleet), DEVICES, canary=1, canary_windows=1, auto_promote=False, seed=0)
    device = _canaries(view)[0]
    assert _get(url, {"X-Edgekit-Device": device})[0] == 200
    code, _, body = _get(url, {"X-Edgekit-Device": device})
    assert code == 429 and b"already fetched" in body
    assert fleet.manager.view(view["deployment"])["devices"][device]["served_bytes"] == len(data)
    assert 'edgekit_fleet_deployments{state="canary"} 1' in fleet.service.metrics()


def test_upload_in_chunks_then_deploy_over_the_api(fleet: Fleet, http: str, tmp_path: Path) -> None:
    other = make_bundle(tmp_path, version="2.0.0")
    data = other.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    chunk = {"sha256": sha, "size": len(data), "offset": 0, "data": base64.b64encode(data[:half]).decode()}
    assert _post(f"{http}/api/bundles", chunk, token=None)[0] == 401
    assert _post(f"{http}/api/bundles", chunk) == (200, {"sha256": sha, "have": half, "complete": False})
    assert _post(f"{http}/api/bundles", chunk)[1]["have"] == half  # a repeated chunk is harmless
    wrong = {**chunk, "offset": half + 1, "data": base64.b64encode(data[half:]).decode()}
    assert _post(f"{http}/api/bundles", wrong)[0] == 409
    rest = {**chunk, "offset": half, "data": base64.b64encode(data[half:]).decode()}
    code, answer = _post(f"{http}/api/bundles", rest)
    assert code == 200 and answer["complete"] is True and answer["path"] == "digits-2.0.0.edgebundle"
    assert (fleet.folder / "digits-2.0.0.edgebundle").read_bytes() == data

    body = {"bundle_sha256": sha, "devices": DEVICES[:3], "canary": 1, "canary_windows": 2}
    assert _post(f"{http}/api/deployments", body, token=None)[0] == 401
    code, view = _post(f"{http}/api/deployments", body)
    assert code == 201 and view["state"] == "canary" and view["version"] == "2.0.0" and view["sha256"] == sha
    dep = view["deployment"]
    code, _, listed = _get(f"{http}/api/deployments", {"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert code == 200 and [d["deployment"] for d in json.loads(listed)["deployments"]] == [dep]
    code, view = _post(f"{http}/api/deployments/{dep}/halt", {})
    assert code == 200 and view["state"] == "halted"
    assert _post(f"{http}/api/deployments/{dep}/promote", {})[0] == 409
    assert _post(f"{http}/api/deployments/{dep}/explode", {})[0] == 404
    assert _post(f"{http}/api/deployments", {"bundle_path": "../x.edgebundle"})[0] == 400
    assert _post(f"{http}/api/deployments", {"url": "http://cdn/x", "sha256": sha, "size": 1, "name": "d",
                                              "version": "1"})[0] == 400  # https only
