"""One device, one voice: no single device, whatever payload the validator accepts, decides a fleet verdict.

Honest devices are real digits windows summarised as the agent does; the extra device's payloads are
generated (hypothesis) and go through the real ingest validator, so every one of them is something a
device could get stored. Then the fleet's decision is the one `evaluate_model` makes from stored rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from device_agent.errors import PayloadError
from edge_kit.fleet import concept, drift
from edge_kit.fleet.alerts import AlertManager
from edge_kit.fleet.ingest import Validator
from edge_kit.fleet.reference_index import ModelReference, ReferenceStore
from edge_kit.fleet.settings import AlertSettings, ConceptSettings, DriftSettings, IngestSettings
from edge_kit.fleet.storage import Storage, WindowRow
from harness.fleetkit import DigitsBundle, logits, sample_images, summary

BASE = 1_900_000_200.0  # a fleet bucket boundary (300 s buckets)
NOW = BASE + 3 * 300.0
HONEST = 8
N = 300
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)


@dataclass
class Fleet:
    bundle: DigitsBundle
    ref: ModelReference
    validator: Validator
    template: dict[str, Any]
    drifting: list[WindowRow]
    clean: list[WindowRow]


def _row(validator: Validator, payload: dict[str, Any]) -> WindowRow:
    topic = f"edgekit/{payload['fleet']}/{payload['device']}/summary"
    return validator.summary(topic, json.dumps(payload).encode(), "application/json", now=NOW)


def _honest(bundle: DigitsBundle, validator: Validator, shift: bool, seed: int) -> list[WindowRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(3):
        for d in range(HONEST):
            x, _ = sample_images(N, rng)
            if shift:
                x = x * 0.7  # contrast: every device of the fleet really drifted
            s = summary(bundle, f"dev{d}", BASE + 300 * w + d, x)
            rows.append(_row(validator, s.to_payload()))
    return rows


@pytest.fixture(scope="module")
def fleet(digits_bundle: DigitsBundle) -> Fleet:
    store = ReferenceStore([digits_bundle.path])
    validator = Validator(store, IngestSettings())
    ref = store.get(digits_bundle.sha256)
    assert ref is not None
    x, _ = sample_images(N, np.random.default_rng(99))
    template = summary(digits_bundle, "intruder", BASE, x).to_payload()
    return Fleet(digits_bundle, ref, validator, template, _honest(digits_bundle, validator, True, 1),
                 _honest(digits_bundle, validator, False, 2))


def _evaluate(f: Fleet, rows: list[WindowRow]) -> drift.Evaluation:
    ordered = sorted(rows, key=lambda r: r.window_start)
    devices, starts, flat, dispersion = drift._arrays(
        f.ref, [(r.device, r.window_start, r.window_end, r.n, r.counts) for r in ordered])
    return drift.evaluate_counts(f.ref, devices, starts, flat, DriftSettings(), NOW, dispersion=dispersion)


@st.composite
def intruder_payloads(draw: st.DrawFn, template: dict[str, Any]) -> dict[str, Any]:
    """Anything shaped like a summary: any n the rate allows, any counts, any dispersion, any n_eff."""
    p = json.loads(json.dumps(template))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.one_of(st.just(N), st.integers(0, 400), st.integers(0, 6_000_000)))
    kind = draw(st.sampled_from(["reference", "one_bin", "random", "copy"]))
    spot = draw(st.integers(0, 63))
    disp = draw(st.sampled_from([None, (1e6, 1, 1e6, 1), (0.0, 0, 0.0, 0), (1e12, 10**9, 1e12, 10**9), "random"]))
    for c in p["channels"].values():
        bins = len(c["counts"])
        if kind == "reference":
            counts = rng.multinomial(n, np.asarray(c["counts"]) / max(sum(c["counts"]), 1))
        elif kind == "one_bin":
            counts = np.zeros(bins, dtype=np.int64)
            counts[spot % bins] = n
        elif kind == "random":
            counts = rng.multinomial(n, rng.dirichlet(np.full(bins, 0.3)))
        else:  # the drifting devices' own mix, to dilute or to push
            counts = rng.multinomial(n, np.roll(np.asarray(c["counts"]) + 1, spot % bins) / (sum(c["counts"]) + bins))
        c["counts"] = [int(v) for v in counts]
        if n == 0:
            c["min"] = c["max"] = None
        if disp is None:
            c.pop("disp", None)
        elif disp == "random":
            c["disp"] = [float(rng.exponential(1e3)), int(rng.integers(0, 1000)), float(rng.exponential(1e3)),
                         int(rng.integers(0, 16))]
        else:
            c["disp"] = list(disp)
    p["n"] = n
    n_eff = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    if n_eff is not None:
        p["n_eff"] = n_eff * n
    return p


def _intruder_rows(f: Fleet, payload: dict[str, Any]) -> list[WindowRow]:
    rows = []
    for w in range(3):  # it speaks in every bucket the fleet is tested on
        p = dict(payload, window={"start": BASE + 300 * w + 50, "end": BASE + 300 * w + 110, "seq": w})
        try:
            rows.append(_row(f.validator, p))
        except PayloadError:
            assume(False)
    return rows


def test_the_honest_fleets_are_what_the_properties_start_from(fleet: Fleet) -> None:
    assert _evaluate(fleet, fleet.drifting).fleet_alert
    quiet = _evaluate(fleet, fleet.clean)
    assert not quiet.fleet_alert and not any(quiet.fleet_flags)


def test_huge_dispersion_from_one_device_no_longer_hides_a_drifting_fleet(fleet: Fleet) -> None:
    payload = json.loads(json.dumps(fleet.template))
    for c in payload["channels"].values():
        c["disp"] = [1e6, 1, 1e6, 1]
    ev = _evaluate(fleet, fleet.drifting + _intruder_rows(fleet, payload))
    assert ev.fleet_alert and ev.fleet_channels


@EXAMPLES
@given(data=st.data())
def test_no_single_extra_device_removes_a_fleet_alert(fleet: Fleet, data: st.DataObject) -> None:
    payload = data.draw(intruder_payloads(fleet.template))
    ev = _evaluate(fleet, fleet.drifting + _intruder_rows(fleet, payload))
    assert ev.fleet_alert, (payload["n"], ev.fleet_flags)
    assert "intruder" not in ev.fleet_support or len(ev.fleet_support) > 1


@EXAMPLES
@given(data=st.data())
def test_no_single_device_raises_a_fleet_alert_over_clean_devices(fleet: Fleet, data: st.DataObject) -> None:
    payload = data.draw(intruder_payloads(fleet.template))
    ev = _evaluate(fleet, fleet.clean + _intruder_rows(fleet, payload))
    assert not ev.fleet_alert and not any(ev.fleet_flags), (payload["n"], ev.fleet_channels)


def test_an_extreme_device_is_still_flagged_on_its_own(fleet: Fleet) -> None:
    payload = json.loads(json.dumps(fleet.template))
    for c in payload["channels"].values():
        c["counts"] = [N] + [0] * (len(c["counts"]) - 1)
    ev = _evaluate(fleet, fleet.clean + _intruder_rows(fleet, payload))
    assert "intruder" in ev.device_alerts and not ev.fleet_alert


# -- labels -----------------------------------------------------------------------------------

def _confusion(correct: int, wrong: int) -> bytes:
    m = np.zeros((10, 10), dtype=np.int64)
    m[0, 0] = correct
    m[1, 2] = wrong
    return m.tobytes()


@pytest.fixture
def labelled(tmp_path: Path, fleet: Fleet) -> Storage:
    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    return storage


def _accuracy(storage: Storage, fleet: Fleet) -> dict[str, Any]:
    acc = concept.labelled_accuracy(storage, fleet.ref, 0.0, ConceptSettings(), 0.01)
    assert acc is not None
    return acc


def test_millions_of_right_labels_from_one_device_do_not_hide_a_fleet_accuracy_drop(labelled: Storage,
                                                                                     fleet: Fleet) -> None:
    for d in range(HONEST):
        labelled.add_labels(f"dev{d}", fleet.ref.sha256, _confusion(150, 150))  # accuracy 0.5
    labelled.add_labels("intruder", fleet.ref.sha256, _confusion(6_000_000, 0))
    acc = _accuracy(labelled, fleet)
    assert acc["accuracy"] < 0.6 and acc["drifted"]  # 0.9997 when the intruder counted in full
    assert acc["n_received"] == HONEST * 300 + 6_000_000


def test_millions_of_wrong_labels_from_one_device_raise_no_fleet_accuracy_drop(labelled: Storage,
                                                                               fleet: Fleet) -> None:
    assert fleet.ref.gate_accuracy is not None
    for d in range(HONEST):
        labelled.add_labels(f"dev{d}", fleet.ref.sha256, _confusion(300, 0))
    labelled.add_labels("intruder", fleet.ref.sha256, _confusion(0, 6_000_000))
    acc = _accuracy(labelled, fleet)
    assert not acc["drifted"] and acc["devices_below_floor"] == ["intruder"]
    alone = concept.labelled_accuracy(labelled, fleet.ref, 0.0, ConceptSettings(), 0.01, device="intruder")
    assert alone is not None and alone["drifted"]  # its own figure still shows it


def test_one_device_alone_raises_no_fleet_accuracy_drop(labelled: Storage, fleet: Fleet) -> None:
    labelled.add_labels("intruder", fleet.ref.sha256, _confusion(0, 6_000_000))
    assert not _accuracy(labelled, fleet)["drifted"]


@st.composite
def intruder_labels(draw: st.DrawFn) -> list[list[int]]:
    """Any confusion matrix a window may carry: up to window (60 s) x max_inferences_per_second labels."""
    total = draw(st.integers(0, 6_000_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["right", "wrong", "random"]))
    m = np.zeros((10, 10), dtype=np.int64)
    if shape == "right":
        m[np.arange(10), np.arange(10)] = rng.multinomial(total, np.full(10, 0.1))
    elif shape == "wrong":
        m[np.arange(10), (np.arange(10) + 1) % 10] = rng.multinomial(total, np.full(10, 0.1))
    else:
        m = rng.multinomial(total, rng.dirichlet(np.ones(100))).reshape(10, 10)
    return [[int(v) for v in row] for row in m]


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(confusion=intruder_labels(), honest_accuracy=st.sampled_from([0.5, 1.0]))
def test_no_single_device_decides_the_fleet_accuracy_verdict(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory,
                                                            confusion: list[list[int]],
                                                            honest_accuracy: float) -> None:
    storage = Storage(f"sqlite:///{tmp_path_factory.mktemp('labels')}/fleet.db")
    try:
        for d in range(HONEST):
            right = int(300 * honest_accuracy)
            storage.add_labels(f"dev{d}", fleet.ref.sha256, _confusion(right, 300 - right))
        payload = json.loads(json.dumps(fleet.template))
        payload["labels"] = {"classes": [str(i) for i in range(10)], "n": int(np.sum(confusion)),
                             "confusion": confusion}
        try:
            row = _row(fleet.validator, payload)
        except PayloadError:
            assume(False)
        storage.ingest([row], [], {})
        acc = _accuracy(storage, fleet)
        assert acc["drifted"] is (honest_accuracy == 0.5), (acc["accuracy"], acc["n_received"])
    finally:
        storage.close()


def test_a_dismissed_alert_does_not_silence_one_that_other_devices_raise(labelled: Storage) -> None:
    alerts = AlertManager(labelled, AlertSettings())
    first, created = alerts.raise_alert("m", "fleet", "accuracy_drop", "drop", {}, support=["intruder"])
    assert created
    alerts.dismiss(first)
    assert alerts.raise_alert("m", "fleet", "accuracy_drop", "drop", {}, support=["intruder"]) == (first, False)
    second, created = alerts.raise_alert("m", "fleet", "accuracy_drop", "drop", {},
                                         support=["dev0", "dev1", "intruder"])
    assert created and second != first
    assert labelled.alert(second)["detail"]["support"] == ["dev0", "dev1", "intruder"]  # type: ignore[index]
    assert alerts.raise_alert("m", "fleet", "accuracy_drop", "drop", {}, support=["dev0"]) == (second, False)


def test_automatic_approval_does_not_run_retraining_for_one_device(labelled: Storage, tmp_path: Path) -> None:
    import sys

    marker = tmp_path / "ran"
    alerts = AlertManager(labelled, AlertSettings(approval="auto", retrain_command=[
        sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]))
    device_alert, _ = alerts.raise_alert("m", "device:intruder", "data_drift", "drift", {}, support=["intruder"])
    fleet_alert, _ = alerts.raise_alert("m", "fleet", "data_drift", "drift", {}, support=["dev0", "dev1"])
    alerts.wait(30)
    assert labelled.alert(device_alert)["state"] == "pending_approval"  # type: ignore[index]
    assert labelled.alert(fleet_alert)["state"] == "retrained" and marker.exists()  # type: ignore[index]


def test_labels_of_the_honest_fleet_alone_give_the_plain_accuracy(labelled: Storage, fleet: Fleet) -> None:
    x, y = sample_images(400, np.random.default_rng(3))
    pred = logits(x).argmax(axis=1)
    for d in range(3):
        m = np.zeros((10, 10), dtype=np.int64)
        np.add.at(m, (y, pred), 1)
        labelled.add_labels(f"dev{d}", fleet.ref.sha256, m.tobytes())
    acc = _accuracy(labelled, fleet)
    assert acc["accuracy"] == pytest.approx(float((pred == y).mean())) and acc["n"] == 1200
