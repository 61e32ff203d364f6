"""Labels that come back after a hot swap for predictions the previous model made."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.errors import InputError
from device_agent.uplink.forwarder import Forwarder
from device_agent.uplink.spool import Spool
from device_agent.uplink.transport import MemoryPublisher
from harness.bundles import digits_like_inputs, make_bundle
from harness.processes import MosquittoBroker
from tests.helpers.mqtt import AgentProcess, Subscriber, wait_until


@pytest.fixture(scope="module")
def bundle_v3(tmp_path_factory: pytest.TempPathFactory, signing_key) -> Path:
    return make_bundle(tmp_path_factory.mktemp("v3"), seed=2, version="3.0.0", signing_key=signing_key)


def _agent(bundle: Path, tmp_path: Path, clock) -> tuple[Agent, MemoryPublisher]:
    publisher = MemoryPublisher()
    agent = Agent(bundle, fleet="f1", device_id="dev1", window_seconds=10,
                  forwarder=Forwarder(Spool(tmp_path / "spool.db"), publisher), clock=clock)
    return agent, publisher


def _labelled_windows(agent: Agent, publisher: MemoryPublisher) -> list[dict]:
    assert agent.forwarder is not None
    agent.forwarder.pump()
    payloads = [json.loads(zlib.decompress(m.payload)) for m in publisher.messages if m.topic.endswith("/summary")]
    return [p for p in payloads if p.get("labels")]


def _confusion_by_model(windows: list[dict]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for w in windows:
        c = np.array(w["labels"]["confusion"])
        out[w["model"]["sha256"]] = out.get(w["model"]["sha256"], 0) + c
    return out


def test_labels_for_the_previous_models_predictions_count_against_that_model(
        bundle_v1: Path, bundle_v2: Path, tmp_path: Path, clock) -> None:
    agent, publisher = _agent(bundle_v1, tmp_path, clock)
    v1_sha = agent.model.runtime.info.sha256
    anonymous = agent.predict(digits_like_inputs(8, seed=1))
    by_id = agent.predict(digits_like_inputs(3, seed=2), request_id="before-swap")
    clock.advance(3)
    agent.update(bundle_v2)
    v2_sha = agent.model.runtime.info.sha256
    assert v2_sha != v1_sha

    # The fleet demo's refusal: 8 labels, 0 predictions of the new model. Now they are v1's.
    assert agent.feed_labels([int(c) for c in anonymous.classes]) == 8
    wrong = [(int(c) + 1) % 10 for c in by_id.classes]
    assert agent.feed_labels(wrong, request_id="before-swap") == 3
    with pytest.raises(InputError, match="remembered"):  # consumed: never labelled twice
        agent.feed_labels([0])
    assert agent.status()["counters"]["labels"] == 11

    agent.close_window(clock.advance(10))
    windows = _labelled_windows(agent, publisher)
    assert [w["model"]["sha256"] for w in windows] == [v1_sha]  # nothing counted against v2
    [late] = windows
    confusion = np.array(late["labels"]["confusion"])
    assert late["n"] == 0 and confusion.sum() == 11 and np.trace(confusion) == 8
    assert late["model"]["version"] == "1.0.0"


def test_the_latest_labels_split_between_the_new_and_the_previous_model(
        bundle_v1: Path, bundle_v2: Path, tmp_path: Path, clock) -> None:
    agent, publisher = _agent(bundle_v1, tmp_path, clock)
    v1_sha = agent.model.runtime.info.sha256
    old = agent.predict(digits_like_inputs(5, seed=3))
    clock.advance(3)
    agent.update(bundle_v2)
    v2_sha = agent.model.runtime.info.sha256
    new = agent.predict(digits_like_inputs(2, seed=4))
    # The 4 latest predictions: v1's last two, then v2's two. v1's are labelled right, v2's wrong.
    labels = [int(c) for c in old.classes[-2:]] + [(int(c) + 1) % 10 for c in new.classes]
    with pytest.raises(InputError, match="not one of the classes"):  # checked before anything is consumed
        agent.feed_labels([*labels[:3], "cat"])
    assert agent.feed_labels(labels) == 4
    agent.close_window(clock.advance(10))
    by_model = _confusion_by_model(_labelled_windows(agent, publisher))
    assert by_model[v1_sha].sum() == 2 and np.trace(by_model[v1_sha]) == 2
    assert by_model[v2_sha].sum() == 2 and np.trace(by_model[v2_sha]) == 0

    # v1's three earlier predictions can still be labelled a window later, and still count as v1's.
    assert agent.feed_labels([int(c) for c in old.classes[:3]]) == 3
    agent.close_window(clock.advance(10))
    later = _labelled_windows(agent, publisher)[-1]
    assert later["model"]["sha256"] == v1_sha and np.array(later["labels"]["confusion"]).sum() == 3
    agent.close_window(clock.advance(10))
    assert agent._retired is None  # everything it remembered is labelled: the previous monitor is let go
    with pytest.raises(InputError, match="remembered"):
        agent.feed_labels([0])


def test_a_second_swap_ships_what_the_first_retired_model_still_held(
        bundle_v1: Path, bundle_v2: Path, bundle_v3: Path, tmp_path: Path, clock) -> None:
    agent, publisher = _agent(bundle_v1, tmp_path, clock)
    v1_sha = agent.model.runtime.info.sha256
    first = agent.predict(digits_like_inputs(4, seed=5))
    clock.advance(3)
    agent.update(bundle_v2)
    agent.feed_labels([int(c) for c in first.classes[-2:]])
    clock.advance(3)
    agent.update(bundle_v3)  # no window closed in between: v1's labelled window ships at this swap
    labelled = _labelled_windows(agent, publisher)
    assert [w["model"]["sha256"] for w in labelled] == [v1_sha]
    assert np.array(labelled[0]["labels"]["confusion"]).sum() == 2


def test_a_retired_model_kept_for_labels_gives_back_its_buffers_and_still_counts_late_predictions(
        bundle_v1: Path, bundle_v2: Path, tmp_path: Path, clock) -> None:
    agent, publisher = _agent(bundle_v1, tmp_path, clock)
    old_runtime = agent.model.runtime
    made = agent.predict(digits_like_inputs(6, seed=8))
    clock.advance(3)
    agent.update(bundle_v2)
    retired = agent._retired
    assert retired is not None and retired.buffer_bytes > 0
    agent.close_window(clock.advance(10))
    assert agent._retired is retired and retired.buffer_bytes == 0  # unlabelled predictions: kept, buffers gone
    # A request that was still running on the old model when the window closed, and labels for it.
    x = digits_like_inputs(2, seed=9)
    logits = old_runtime.run(x)
    retired.record(x, logits, logits.argmax(axis=1), None)
    assert agent.feed_labels([int(c) for c in made.classes] + [int(c) for c in logits.argmax(axis=1)]) == 8
    agent.close_window(clock.advance(10))
    assert agent._retired is None  # all it remembered is labelled
    assert agent.forwarder is not None
    agent.forwarder.pump()
    payloads = [json.loads(zlib.decompress(m.payload)) for m in publisher.messages if m.topic.endswith("/summary")]
    late = payloads[-1]
    confusion = np.array(late["labels"]["confusion"])
    assert late["model"]["version"] == "1.0.0" and late["n"] == 2
    assert confusion.sum() == 8 and np.trace(confusion) == 8  # each label met the prediction it names


@pytest.mark.slow
@pytest.mark.integration
def test_a_running_agent_takes_labels_over_http_for_predictions_made_before_a_swap(
        mosquitto: MosquittoBroker, bundle_v1: Path, bundle_v2: Path, tmp_path: Path, keypair) -> None:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    shutil.copy(bundle_v1, bundles / "a.edgebundle")
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, "--bundle", str(bundles), "--broker", mosquitto.url, "--device-id", "dev-l",
                         "--fleet", "test", "--spool", str(tmp_path / "s.db"), "--window-seconds", "1",
                         "--pubkey", str(keypair[1]), config="[agent]\nwatch_interval = 0.2\n")
    try:
        v1 = agent.status()["model"]
        answer = agent.post("/predict", {"inputs": digits_like_inputs(8, seed=6).tolist()})
        assert answer["model"] == v1
        shutil.copy(bundle_v2, bundles / "b.edgebundle.tmp")
        (bundles / "b.edgebundle.tmp").rename(bundles / "b.edgebundle")
        wait_until(lambda: agent.status()["model"]["version"] == "2.0.0", 20, "the new bundle")

        # The fleet demo's feeder: the labels of the batch it sent just before the swap.
        assert agent.post("/labels", {"labels": answer["predictions"]}) == {"counted": 8}
        assert agent.status()["counters"]["labels"] == 8

        def labelled_windows() -> list[dict]:
            return [w for w in sub.unique_windows().values() if w.get("labels")]

        wait_until(labelled_windows, 20, "a window with the late labels")
        [late] = labelled_windows()
        assert late["model"]["sha256"] == v1["sha256"] and late["model"]["version"] == "1.0.0"
        confusion = np.array(late["labels"]["confusion"])
        assert confusion.sum() == 8 and np.trace(confusion) == 8  # the predictions themselves, as ground truth
    finally:
        assert agent.stop() == 0
        sub.close()
