"""The ingest shortcut (`Validator._plain_row`) accepts nothing the full checks (`_checked_row`) refuse, and
builds the same row: checked on thousands of seeded mutations of a real summary (values of every awkward
type at every place, keys removed and added, labels, zlib or plain). It also must stay the path an honest
summary takes, or the consumer silently loses its speed."""

from __future__ import annotations

import copy
import json
import random
import time
import zlib
from typing import Any

import numpy as np
import pytest

from device_agent.errors import PayloadError
from edge_kit.fleet.ingest import Validator
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.settings import IngestSettings
from harness.fleetkit import make_bundle, sample_images, summary

AWKWARD = [True, False, None, -1, 0, 1, 1.5, 2.0, -0.0, "x", "", [], {}, [1], {"a": 1}, 2**63 - 1, 2**63, 2**64 - 1,
           2**64, 10**12, 10**12 + 1, 1e300, -1e-7, "\x00", "é", "a" * 300, 200, 199, float("nan"), float("inf"),
           [0, 0, 0, 0], [1.0, 2, 3.0, 4], [1.0, 2.0, 3.0, 4], 12]


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Validator, dict[str, Any], float]:
    bundle = make_bundle(tmp_path_factory.mktemp("shortcut"))
    window = summary(bundle, "d", 0.0, sample_images(200, np.random.default_rng(0))[0], fleet="bench")
    now = time.time()
    window.window_start = now - 1000
    window.window_end = window.window_start + 60
    return Validator(ReferenceStore([bundle.path]), IngestSettings()), window.to_payload(), now


def _places(x: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(x, dict):
        for k, v in x.items():
            found += _places(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            found += _places(v, (*path, i))
    return found


def _mutate(doc: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        where = rng.choice(_places(d)[1:])
        parent: Any = d
        for k in where[:-1]:
            parent = parent[k]
        r = rng.random()
        if r < 0.7:
            parent[where[-1]] = copy.deepcopy(rng.choice(AWKWARD))
        elif r < 0.85 and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[f"extra{rng.random()}"] = rng.choice(AWKWARD)
        else:
            parent.append(rng.choice(AWKWARD))
    return d


def _both(v: Validator, d: dict[str, Any], rng: random.Random, now: float) -> tuple[Any, Any]:
    raw = json.dumps(d).encode()
    data, content_type = (zlib.compress(raw), "application/json+zlib") if rng.random() < 0.5 else (raw, None)
    device = d["device"] if isinstance(d.get("device"), str) and d["device"] else "d"
    fleet = d["fleet"] if isinstance(d.get("fleet"), str) and d["fleet"] else "bench"
    try:
        fast = v._plain_row(fleet, device, data, content_type, now)
    except Exception:  # the consumer treats any exception of the shortcut as "take the full checks"
        fast = None
    try:
        slow: Any = v._checked_row(fleet, device, f"edgekit/{fleet}/{device}/summary", data, content_type, now)
    except PayloadError as exc:
        slow = ("refused", exc.kind)
    return fast, slow


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shortcut_accepts_only_what_the_full_checks_accept_and_builds_the_same_row(
        honest: tuple[Validator, dict[str, Any], float], seed: int) -> None:
    v, doc, now = honest
    rng = random.Random(seed)
    labels = list(v.references.get(doc["model"]["sha256"]).labels)  # type: ignore[union-attr]
    taken = 0
    for _ in range(1500):
        d = _mutate(doc, rng)
        if rng.random() < 0.1:
            d["labels"] = {"classes": labels, "n": 3,
                           "confusion": [[rng.choice([0, 1, 0, True, 1.0]) for _ in labels] for _ in labels]}
        fast, slow = _both(v, d, rng, now)
        if fast is not None:
            taken += 1
            assert fast == slow, json.dumps(d)[:2000]
    assert taken > 0  # some mutations stay well-formed (a changed statistic, an extra key): the shortcut takes them


def test_an_honest_summary_takes_the_shortcut(honest: tuple[Validator, dict[str, Any], float]) -> None:
    v, doc, now = honest
    fast, slow = _both(v, doc, random.Random(0), now)
    assert fast is not None and fast == slow
