"""Hostile or broken device input: refused by name, never stored unchecked, never a
redelivery loop, never one device speaking for the fleet."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.monitoring.summary import WindowSummary
from edge_kit.fleet.ingest import Ingestor, Validator
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.service import FleetService
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.fleetkit import DigitsBundle, digits_model, sample_images, summary

TOPIC = "edgekit/test/{}/summary"


@pytest.fixture
def store(tmp_path: Path, digits_bundle: DigitsBundle) -> tuple[Storage, ReferenceStore]:
    return Storage(f"sqlite:///{tmp_path}/fleet.db"), ReferenceStore([digits_bundle.path])


def _payload(bundle: DigitsBundle, device: str, start: float, seed: int = 0, n: int = 50) -> dict:
    x, _ = sample_images(n, np.random.default_rng(seed))
    data, _ = summary(bundle, device, start, x).to_bytes(compress=False)
    return json.loads(data)


def _raw(p: dict) -> bytes:
    return json.dumps(p).encode()


@pytest.mark.parametrize("poison, kind", [
    (lambda p: p["window"].update(seq=2**64 - 1), "window"),
    (lambda p: p["model"].update(name="digits\x00"), "strings"),
    (lambda p: p["model"].update(version="1.0\ud800"), "strings"),
    (lambda p: p.update(device="d" * 1000), "strings"),
    (lambda p: p.update(n=2**63) or [c.update(counts=[2**63] + [0] * (len(c["counts"]) - 1))
                                     for c in p["channels"].values()], "counts"),
])
def test_a_poison_summary_is_refused_by_name_and_its_batch_is_kept(store: tuple[Storage, ReferenceStore],
                                                                   digits_bundle: DigitsBundle, poison: object,
                                                                   kind: str) -> None:
    storage, refs = store
    ingestor = Ingestor(storage, refs, parse_settings({}).ingest)
    now = time.time()
    good = [_payload(digits_bundle, f"dev{i}", now - 600, seed=i) for i in range(4)]
    bad = _payload(digits_bundle, "dev9", now - 600, seed=9)
    if bad["device"] == "dev9":
        poison(bad)  # type: ignore[operator]
    for i, p in enumerate([*good[:2], bad, *good[2:]]):
        ingestor.receive(TOPIC.format(p["device"]), _raw(p), "application/json", mid=i + 1, qos=1)
    acked = ingestor.flush()
    assert [m for m, _ in acked] == [1, 2, 3, 4, 5]  # all acknowledged: nothing to redeliver
    assert storage.window_count() == 4
    assert storage.counters()[f"rejected:{kind}"] == 1


def test_a_row_the_database_refuses_is_rejected_alone(store: tuple[Storage, ReferenceStore],
                                                      digits_bundle: DigitsBundle) -> None:
    # Whatever validation misses and the database refuses: the batch is stored row by row.
    storage, refs = store
    ingestor = Ingestor(storage, refs, parse_settings({}).ingest)
    now = time.time()
    for i in range(3):
        p = _payload(digits_bundle, f"dev{i}", now - 600, seed=i)
        ingestor.receive(TOPIC.format(p["device"]), _raw(p), "application/json", mid=i + 1, qos=1)
    good = ingestor.batch.windows[1]
    ingestor.batch.windows[1] = dataclasses.replace(good, seq=2**64 - 1)  # overflows SQLite INTEGER
    assert len(ingestor.flush()) == 3
    assert storage.window_count() == 2
    counters = storage.counters()
    assert counters["rejected:storage"] == 1 and counters["accepted"] == 2 and counters["received"] == 3
    assert ingestor.totals["accepted"] == 2 and ingestor.totals["duplicate"] == 0


def test_model_name_and_version_come_from_the_reference(store: tuple[Storage, ReferenceStore],
                                                        digits_bundle: DigitsBundle) -> None:
    _, refs = store
    p = _payload(digits_bundle, "dev0", time.time() - 600)
    p["model"].update(name="<script>alert(1)</script>", version="9.9.9")
    row = Validator(refs, parse_settings({}).ingest).summary(TOPIC.format("dev0"), _raw(p), None)
    ref = refs.get(p["model"]["sha256"])
    assert ref is not None and (row.model_name, row.model_version) == (ref.name, ref.version)


def test_a_device_cannot_claim_more_inferences_or_labels_than_possible(store: tuple[Storage, ReferenceStore],
                                                                       digits_bundle: DigitsBundle) -> None:
    _, refs = store
    validator = Validator(refs, parse_settings({"ingest": {"max_inferences_per_second": 10}}).ingest)
    now = time.time()
    s = summary(digits_bundle, "dev0", now - 600, sample_images(700, np.random.default_rng(0))[0], end=now - 540)
    with pytest.raises(ValueError, match="rate"):  # 700 inferences in 60 s at most 10/s
        validator.summary(TOPIC.format("dev0"), *s.to_bytes())
    x, y = sample_images(50, np.random.default_rng(1))
    s = summary(digits_bundle, "dev0", now - 600, x, y=y)
    assert s.confusion is not None
    s.confusion[0, 0] += 10  # late labels for the previous window's predictions: more than n, still plausible
    assert validator.summary(TOPIC.format("dev0"), *s.to_bytes()) is not None
    s.confusion[0, 0] += 600  # more labels than 60 s at 10/s could have produced
    with pytest.raises(ValueError, match="labels_over_n"):
        validator.summary(TOPIC.format("dev0"), *s.to_bytes())


@pytest.mark.parametrize("status", [
    b'{"state": "online", "temp": NaN}', b'{"state": "online", "temp": Infinity}', b'{"state": "online", "x": 1e999}',
    b'{"state": "online", "x": 99999999999999999999999}', b'{"state": "online", "x": "\\ud800"}',
])
def test_status_with_non_finite_or_unstorable_values_is_refused(status: bytes) -> None:
    with pytest.raises(ValueError):
        Validator.status("edgekit/test/dev0/status", status)


def _inflate(s: WindowSummary, k: int) -> WindowSummary:
    s.counts = s.counts * k
    s.n *= k
    s.total = s.total * k
    s.total_sq = s.total_sq * k
    return s


def test_one_device_with_an_inflated_n_does_not_raise_a_fleet_alert(store: tuple[Storage, ReferenceStore],
                                                                     digits_bundle: DigitsBundle) -> None:
    storage, refs = store
    settings = parse_settings({"drift": {"k": 2, "m": 3, "min_n": 100}})
    ingestor = Ingestor(storage, refs, settings.ingest)
    rng = np.random.default_rng(7)
    x_pool, y_pool = digits_model()[:2]
    only_low_digits = x_pool[y_pool < 5]  # dev00 sees a prior shift: real for it, too small for the fleet
    now = time.time()
    for w in range(3):
        start = now - 300.0 * (3 - w) + 1.0
        for d in range(8):
            name = f"dev{d:02d}"
            if d == 0:
                x = only_low_digits[rng.integers(0, len(only_low_digits), 300)]
            else:
                x, _ = sample_images(300, rng)
            s = summary(digits_bundle, name, start, x, seq=w, end=start + 290.0)
            if d == 0:  # ... and claims to have seen 10,000x the inferences it ran
                s = _inflate(s, 10_000)
            ingestor.receive(TOPIC.format(name), *s.to_bytes())
        ingestor.flush()
    assert storage.window_count() == 24
    service = FleetService(storage, refs, settings)
    ev = service.evaluate(now)[digits_bundle.sha256]
    assert "dev00" in ev.device_alerts  # the device itself is still flagged
    assert not ev.fleet_alert, ev.fleet_channels
    assert not [a for a in storage.alerts() if a["scope"] == "fleet"]


@pytest.mark.parametrize("body", [
    {"confusion": "NEG"}, {"confusion": "HUGE"}, {"confusion": "UINT"},
    {"true": [0, 1], "pred": [0, 2**70]}, {"true": [0.5], "pred": [1]}, {"true": ["1"], "pred": [1]},
])
def test_labels_refuse_negative_or_overflowing_counts(service: FleetService, body: dict) -> None:
    ref = service.references.all()[0]
    k = len(ref.labels)
    m = [[0] * k for _ in range(k)]
    if body.get("confusion") == "NEG":
        m[0][0] = -1
    elif body.get("confusion") == "HUGE":
        m[0][0] = 2**70
    elif body.get("confusion") == "UINT":
        m[0][0] = 2**64 - 1  # numpy makes this uint64: astype(int64) would wrap it to -1
    if "confusion" in body:
        body = {"confusion": m}
    before = service.storage.counters()
    with pytest.raises(ValueError):
        service.add_labels({"device": "dev00", "model_sha256": ref.sha256, **body})
    assert service.storage.counters() == before


def test_one_model_failing_evaluation_does_not_stop_the_others(service: FleetService,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_kit.fleet import drift

    real = drift.evaluate_model
    ref = service.references.all()[0]
    broken = dataclasses.replace(ref, sha256="0" * 64) if dataclasses.is_dataclass(ref) else None
    calls: list[str] = []

    def flaky(storage: Storage, r: object, settings: object, now: float | None = None) -> object:
        calls.append(r.sha256)  # type: ignore[attr-defined]
        if r is broken:
            raise RuntimeError("a bug in one model's evaluation")
        return real(storage, r, settings, now)  # type: ignore[arg-type]

    monkeypatch.setattr(drift, "evaluate_model", flaky)
    monkeypatch.setattr(service.references, "all", lambda: [broken, ref])
    monkeypatch.setattr(service.storage, "models_with_windows", lambda since: ["0" * 64, ref.sha256])
    evaluations = service.evaluate()
    assert calls == ["0" * 64, ref.sha256]
    assert ref.sha256 in evaluations
