"""The fleet stores labels that came back after a device's hot swap against the model that predicted."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from edge_kit.fleet.ingest import Ingestor
from edge_kit.fleet.reference_index import ReferenceStore
from edge_kit.fleet.settings import parse_settings
from edge_kit.fleet.storage import Storage
from harness.bundles import digits_like_inputs, make_bundle


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return (make_bundle(tmp_path_factory.mktemp("v1"), seed=0, version="1.0.0"),
            make_bundle(tmp_path_factory.mktemp("v2"), seed=1, version="2.0.0"))


def test_late_labels_after_a_swap_are_stored_against_the_previous_version(
        two_versions: tuple[Path, Path], tmp_path: Path) -> None:
    v1, v2 = two_versions
    now = [time.time() - 120]
    agent = Agent(v1, fleet="test", device_id="dev0", window_seconds=10, clock=lambda: now[0])
    v1_sha = agent.model.runtime.info.sha256
    before = agent.predict(digits_like_inputs(8, seed=7))
    now[0] += 5
    agent.update(v2)
    v2_sha = agent.model.runtime.info.sha256
    truth = [(int(c) + i % 2) % 10 for i, c in enumerate(before.classes)]  # half right, half wrong
    assert agent.feed_labels(truth) == 8
    now[0] += 10
    agent.close_window()
    windows = list(agent.closed_windows)
    assert {w.model["sha256"] for w in windows} == {v1_sha}  # the swap's window, then the late labels'

    storage = Storage(f"sqlite:///{tmp_path}/fleet.db")
    ingestor = Ingestor(storage, ReferenceStore([v1, v2]), parse_settings({}).ingest)
    for mid, w in enumerate(windows, start=1):
        ingestor.receive("edgekit/test/dev0/summary", *w.to_bytes(), mid=mid, qos=1)
    assert [m for m, _ in ingestor.flush()] == list(range(1, len(windows) + 1))
    assert storage.window_count(v1_sha) == len(windows)  # the labels-only window (n = 0) is not refused
    [(device, confusion)] = storage.labels(v1_sha, since=0)
    counts = np.frombuffer(confusion, dtype=np.int64)
    assert device == "dev0" and counts.sum() == 8 and np.trace(counts.reshape(10, 10)) == 4
    assert storage.labels(v2_sha, since=0) == []
