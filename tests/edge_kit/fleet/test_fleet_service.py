"""The service end to end without a broker: stored windows -> evaluation -> alerts -> HTTP API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edge_kit.fleet.service import FleetService
from harness.fleetkit import OPERATOR_TOKEN, DigitsBundle, sample_images


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {OPERATOR_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_noisy_devices_raise_device_alerts_and_clean_ones_do_not(service: FleetService) -> None:
    alerts = service.storage.alerts()
    scopes = {a["scope"] for a in alerts if a["kind"] == "data_drift"}
    assert {"device:dev00", "device:dev01"} <= scopes
    assert not any(s.startswith("device:dev0") and s not in ("device:dev00", "device:dev01") for s in scopes)
    assert all(a["state"] == "pending_approval" for a in alerts)  # manual approval is the default
    # Evaluating again does not raise the same alert twice.
    service.evaluate()
    assert len(service.storage.alerts()) == len(alerts)


def test_drift_api_fleet_and_device(http: str, digits_bundle: DigitsBundle) -> None:
    d = _get(f"{http}/api/drift")
    fleet = d["results"]
    assert {r["channel"] for r in fleet} == set(digits_bundle.reference.names)
    for r in fleet:
        assert {"model", "scope", "channel", "test", "statistic", "p_value", "effect", "drifted"} <= set(r)
    assert {r["test"] for r in fleet} == {"ks+chi2", "chi2"}
    drifted_devices = {r["device"] for r in d["devices"] if r["drifted"]}
    assert drifted_devices == {"dev00", "dev01"}
    dev = _get(f"{http}/api/drift?device=dev00")["results"]
    assert any(r["drifted"] and r["channel"] == "in.std" for r in dev)  # pixel noise moves the pixel sd
    clean = _get(f"{http}/api/drift?device=dev05")["results"]
    assert clean and not any(r["drifted"] for r in clean)
    history = _get(f"{http}/api/drift?history=1&channel=in.std")["results"]
    assert len({r["window_start"] for r in history}) == 3


def test_devices_histogram_and_metrics(http: str, digits_bundle: DigitsBundle) -> None:
    devs = _get(f"{http}/api/devices")
    assert devs["online"] == 8 and devs["models"][0]["sha256"] == digits_bundle.sha256
    h = _get(f"{http}/api/histogram?model={digits_bundle.sha256}&channel=out.pred")
    assert h["kind"] == "class" and len(h["reference"]) == 10 and sum(h["current"]) == pytest.approx(1.0)
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert 'edgekit_fleet_summaries_total{outcome="accepted"} 24' in text
    assert 'edgekit_fleet_devices{state="online"} 8' in text
    assert 'edgekit_fleet_drift_p_value{model="digits",version="1.0.0",channel="in.std"}' in text
    assert 'edgekit_fleet_devices_drifted{model="digits",version="1.0.0"} 2' in text
    assert 'edgekit_fleet_alerts{state="pending_approval"}' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_approve_runs_retraining_once_then_rate_limits(http: str, service: FleetService) -> None:
    first, second = [a["id"] for a in service.storage.alerts()][:2]
    status, body = _post(f"{http}/api/alerts/{first}/approve", {"by": "alice"})
    assert status == 200 and body["approved_by"] == "alice"
    service.alerts.wait()
    a = service.storage.alert(first)
    assert a is not None and a["state"] == "retrained"
    t = a["triggers"][-1]
    assert t["outcome"] == "succeeded" and t["returncode"] == 0 and f"retrain {first}" in t["output"]
    status, body = _post(f"{http}/api/alerts/{second}/approve", {})
    assert status == 200 and body["state"] == "rate_limited"
    assert body["triggers"][-1]["outcome"] == "rate_limited"
    # Approving an alert that is not waiting is refused; unknown ids are 404.
    assert _post(f"{http}/api/alerts/{first}/approve", {})[0] == 409
    assert _post(f"{http}/api/alerts/999/approve", {})[0] == 404
    with urllib.request.urlopen(f"{http}/api/alerts?format=csv", timeout=10) as r:
        csv_text = r.read().decode()
    assert csv_text.splitlines()[0].startswith("id,created_at") and "rate_limited" in csv_text


def test_labels_give_accuracy_and_estimate_is_marked(http: str, service: FleetService,
                                                      digits_bundle: DigitsBundle) -> None:
    x, y = sample_images(400, np.random.default_rng(5))
    from harness.fleetkit import logits

    pred = logits(x).argmax(axis=1)
    wrong = pred.copy()
    wrong[:200] = (wrong[:200] + 1) % 10  # half of them wrong: far below the gate
    for device in ("dev03", "dev04"):  # a fleet's accuracy drop needs more than one device's labels
        status, body = _post(f"{http}/api/labels", {"device": device, "model_sha256": digits_bundle.sha256,
                                                    "true": y.tolist(), "pred": wrong.tolist()})
        assert status == 200 and body["n"] == 400
    c = _get(f"{http}/api/concept")["models"][0]
    assert c["labelled"]["estimate"] is False and c["labelled"]["accuracy"] == pytest.approx(
        float((wrong == y).mean()))
    assert c["labelled"]["drifted"] is True
    est = c["estimated"]
    assert est["estimate"] is True and "input shift" in est["caveat"]
    assert 0.5 < est["accuracy"] <= 1.0
    service.evaluate()
    assert any(a["kind"] == "accuracy_drop" for a in service.storage.alerts())
    assert _post(f"{http}/api/labels", {"device": "d", "model_sha256": digits_bundle.sha256,
                                        "confusion": [[1, 2]]})[0] == 400
    assert _post(f"{http}/api/labels", {"device": "d", "model_sha256": "nope"})[0] == 400


def test_dashboard_assets_are_served_locally(http: str) -> None:
    with urllib.request.urlopen(f"{http}/", timeout=10) as r:
        page = r.read().decode()
    assert "/static/chart.umd.min.js" in page and "cdn" not in page.lower()
    with urllib.request.urlopen(f"{http}/static/chart.umd.min.js", timeout=10) as r:
        assert b"Chart.js v4" in r.read(300)
    try:
        urllib.request.urlopen(f"{http}/static/../storage.py", timeout=10)
        raise AssertionError("path traversal served a file")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    time.sleep(0)
