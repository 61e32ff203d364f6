"""The embeddable Agent with an in-memory publisher: windows, summaries, labels, spool, hot updates."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent, load_model
from device_agent.errors import InputError, VerificationError
from device_agent.monitoring.summary import WindowSummary
from device_agent.monitoring.window import WindowMonitor
from device_agent.uplink.forwarder import Forwarder
from device_agent.uplink.spool import Spool
from device_agent.uplink.transport import MemoryPublisher
from harness.bundles import digits_like_inputs


def _agent(bundle: Path, tmp_path: Path, clock, publisher: MemoryPublisher | None = None,
           **kw) -> tuple[Agent, MemoryPublisher, Spool]:
    publisher = publisher or MemoryPublisher()
    spool = Spool(tmp_path / "spool.db")
    agent = Agent(bundle, fleet="f1", device_id="dev1", window_seconds=10, forwarder=Forwarder(spool, publisher),
                  clock=clock, **kw)
    return agent, publisher, spool


def summaries(publisher: MemoryPublisher) -> list[dict]:
    return [json.loads(zlib.decompress(m.payload)) for m in publisher.messages if m.topic.endswith("/summary")]


@pytest.mark.parametrize("background", [True, False])
def test_buffered_monitoring_gives_exactly_the_unbuffered_summary(bundle_v1: Path, background: bool) -> None:
    loaded = load_model(bundle_v1)
    plan, runtime = loaded.runtime.plan, loaded.runtime
    model = runtime.info.as_dict()
    monitor = WindowMonitor(plan, loaded.histogrammer, fleet="f", device="d", model=model, window_start=0.0,
                            chunk=256, label_memory=10, background=background)
    x = digits_like_inputs(700, seed=3)
    logits = runtime.run(x)
    classes = logits.argmax(axis=1)
    sizes = [1, 5, 32, 300, 1, 61, 300]  # crosses the chunk size both ways, and wraps the label ring
    offsets = np.cumsum([0, *sizes])
    for a, b in itertools.pairwise(offsets):
        monitor.record(x[a:b], logits[a:b], classes[a:b], None)
    assert monitor.n == 700
    closed = monitor.close(10.0)
    expected = WindowSummary.zero(loaded.histogrammer, fleet="f", device="d", model=model, window_start=0.0,
                                  label_names=list(plan.labels))
    expected.update(loaded.histogrammer, plan.values(x, logits))
    np.testing.assert_array_equal(closed.counts, expected.counts)
    np.testing.assert_allclose(closed.total, expected.total, rtol=1e-9)
    np.testing.assert_allclose(closed.minimum, expected.minimum)
    np.testing.assert_allclose(closed.maximum, expected.maximum)
    # Labels for the 3 most recent predictions, read back across the ring's wrap-around.
    monitor.feed_labels([int(c) for c in classes[-3:]])
    assert monitor.summary.confusion is not None and np.trace(monitor.summary.confusion) == 3
    with pytest.raises(InputError, match="remembered"):
        monitor.feed_labels([0] * 11)


def test_the_agent_windows_count_every_prediction(bundle_v1: Path, clock) -> None:
    agent = Agent(bundle_v1, window_seconds=10, clock=clock)
    for size in (1, 7, 32):
        agent.predict(digits_like_inputs(size))
    closed = agent.close_window(clock.advance(10))
    assert closed is not None and closed.n == 40 and (closed.counts.sum(axis=1) == 40).all()


def test_a_closed_window_is_spooled_published_and_deleted_after_the_ack(bundle_v1: Path, tmp_path: Path,
                                                                        clock) -> None:
    publisher = MemoryPublisher(auto_ack=False)
    agent, publisher, spool = _agent(bundle_v1, tmp_path, clock, publisher)
    result = agent.predict(digits_like_inputs(4))
    assert len(result.labels) == 4 and result.outputs.shape == (4, 10)
    assert not agent.window_due(clock.advance(9.9))
    assert agent.window_due(clock.advance(0.1))
    closed = agent.close_window()
    assert closed is not None and closed.n == 4
    assert len(spool) == 1  # spooled before anything was sent
    assert agent.forwarder is not None and agent.forwarder.pump() == 1
    assert len(spool) == 1  # sent but not acknowledged: still spooled
    assert agent.forwarder.pump() == 0  # in flight: not sent twice
    publisher.ack_all()
    assert len(spool) == 0
    [payload] = summaries(publisher)
    assert set(payload) == {"schema", "fleet", "device", "model", "window", "n", "n_eff", "channels"}
    assert 0 < payload["n_eff"] <= payload["n"]  # effective sample size after exact repeats of inputs
    assert payload["schema"] == "edgekit.summary/1"
    assert (payload["fleet"], payload["device"], payload["n"]) == ("f1", "dev1", 4)
    assert payload["model"]["sha256"] == agent.model.runtime.info.sha256
    assert payload["window"]["end"] - payload["window"]["start"] == pytest.approx(10.0)
    ref = agent.model.histogrammer
    for i, name in enumerate(ref.names):
        assert len(payload["channels"][name]["counts"]) == ref.bins[i]
        assert sum(payload["channels"][name]["counts"]) == 4
    status = json.loads(publisher.retained["edgekit/f1/dev1/status"].payload)
    assert status["state"] == "online" and status["counters"]["predictions"] == 4


def test_windows_wait_in_the_spool_while_disconnected_and_survive_a_restart(bundle_v1: Path, tmp_path: Path,
                                                                            clock) -> None:
    offline = MemoryPublisher(is_connected=False)
    agent, _, spool = _agent(bundle_v1, tmp_path, clock, offline)
    for _ in range(3):
        agent.predict(digits_like_inputs(2))
        agent.close_window(clock.advance(10))
    assert agent.forwarder is not None and agent.forwarder.pump() == 0
    assert len(spool) == 3
    spool.close()  # the process goes away

    online = MemoryPublisher()
    agent2, _, spool2 = _agent(bundle_v1, tmp_path, clock, online)
    assert agent2.forwarder is not None and agent2.forwarder.pump() == 3
    assert len(spool2) == 0
    seqs = [p["window"]["seq"] for p in summaries(online)]
    assert seqs == [0, 1, 2]
    # The window sequence continues after the restart instead of starting over.
    agent2.predict(digits_like_inputs(1))
    closed = agent2.close_window(clock.advance(10))
    assert closed is not None and closed.seq == 3


def test_idle_windows_are_not_sent(bundle_v1: Path, tmp_path: Path, clock) -> None:
    agent, publisher, spool = _agent(bundle_v1, tmp_path, clock)
    assert agent.close_window(clock.advance(10)) is None
    assert len(spool) == 0 and summaries(publisher) == []


def test_labels_fed_back_become_confusion_counts(bundle_v1: Path, tmp_path: Path, clock) -> None:
    agent, publisher, _ = _agent(bundle_v1, tmp_path, clock)
    first = agent.predict(digits_like_inputs(3, seed=1), request_id="r1")
    second = agent.predict(digits_like_inputs(2, seed=2))
    assert agent.feed_labels([int(c) for c in second.classes]) == 2  # the two most recent: both right
    wrong = [(int(c) + 1) % 10 for c in first.classes]
    assert agent.feed_labels([str(c) for c in wrong], request_id="r1") == 3  # by name, by request
    with pytest.raises(InputError, match="unknown"):
        agent.feed_labels([1], request_id="nope")
    with pytest.raises(InputError, match="not one of the classes"):
        agent.feed_labels(["cat"])
    with pytest.raises(InputError, match="already labelled"):  # labels consume what they label
        agent.feed_labels([str(c) for c in wrong], request_id="r1")
    with pytest.raises(InputError, match="remembered"):  # the two anonymous ones are labelled too
        agent.feed_labels([0])
    agent.predict(digits_like_inputs(2, seed=3), request_id="r2")
    with pytest.raises(InputError, match="samples"):
        agent.feed_labels([1], request_id="r2")
    agent.close_window(clock.advance(10))
    assert agent.forwarder is not None
    agent.forwarder.pump()
    [payload] = summaries(publisher)
    confusion = np.array(payload["labels"]["confusion"])
    assert payload["labels"]["n"] == 5 and confusion.sum() == 5
    assert np.trace(confusion) == 2
    assert agent.status()["counters"]["bad_requests"] == 5


def test_bad_requests_are_counted_and_the_agent_keeps_serving(bundle_v1: Path, clock) -> None:
    agent = Agent(bundle_v1, clock=clock)
    for bad in (np.ones((2, 7)), np.full((1, 8, 8), np.nan), [["x"] * 64]):
        with pytest.raises(InputError):
            agent.predict(bad)
    assert agent.predict(digits_like_inputs(1)).classes.shape == (1,)
    counters = agent.status()["counters"]
    assert counters["bad_requests"] == 3 and counters["predictions"] == 1


def test_hot_update_swaps_only_a_verified_self_tested_bundle(bundle_v1: Path, bundle_v2: Path, tmp_path: Path,
                                                             clock, keypair) -> None:
    from device_agent.bundle.signing import load_public_key

    agent, publisher, _ = _agent(bundle_v1, tmp_path, clock, public_key=load_public_key(keypair[1]))
    v1_sha = agent.model.runtime.info.sha256
    agent.predict(digits_like_inputs(5))

    garbage = tmp_path / "garbage.edgebundle"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(VerificationError):
        agent.update(garbage)
    assert agent.model.runtime.info.sha256 == v1_sha
    assert agent.forwarder is not None
    agent.forwarder.pump()
    status = json.loads(publisher.retained["edgekit/f1/dev1/status"].payload)
    assert status["update"]["ok"] is False and "garbage.edgebundle" in status["update"]["error"]
    assert agent.predict(digits_like_inputs(1)).labels  # still serving

    result = agent.update(bundle_v2)
    assert result["ok"] and result["changed"]
    assert agent.model.runtime.info.version == "2.0.0"
    assert agent.forwarder is not None
    agent.forwarder.pump()
    # The old model's window was closed at the swap, under the old model's sha256.
    [old_window] = summaries(publisher)
    assert old_window["model"]["sha256"] == v1_sha and old_window["n"] == 6
    agent.predict(digits_like_inputs(2))
    agent.close_window(clock.advance(10))
    agent.forwarder.pump()
    new_window = summaries(publisher)[-1]
    assert new_window["model"]["version"] == "2.0.0" and new_window["n"] == 2
    assert new_window["window"]["seq"] == old_window["window"]["seq"] + 1


def test_closed_windows_stay_in_memory_without_a_forwarder(bundle_v1: Path, clock) -> None:
    agent = Agent(bundle_v1, clock=clock)
    agent.predict(digits_like_inputs(3))
    agent.close_window(clock.advance(60))
    assert [w.n for w in agent.closed_windows] == [3]


def test_load_model_accepts_a_directory_and_picks_the_newest(bundle_v1: Path, bundle_v2: Path, tmp_path: Path) -> None:
    d = tmp_path / "bundles"
    d.mkdir()
    shutil.copy(bundle_v1, d / bundle_v1.name)
    shutil.copy(bundle_v2, d / bundle_v2.name)
    os.utime(d / bundle_v1.name, (1, 1))
    assert load_model(d).runtime.info.version == "2.0.0"


def test_start_up_skips_a_newer_garbage_bundle_in_the_directory(bundle_v1: Path, tmp_path: Path, clock) -> None:
    d = tmp_path / "bundles"
    d.mkdir()
    shutil.copy(bundle_v1, d / "good.edgebundle")
    (d / "newer.edgebundle").write_bytes(b"garbage")
    os.utime(d / "good.edgebundle", (1, 1))
    agent = Agent(d, clock=clock)
    assert agent.model.path.name == "good.edgebundle"
    assert agent.status()["update"]["ok"] is False and "newer.edgebundle" in agent.status()["update"]["error"]
    (d / "good.edgebundle").unlink()
    with pytest.raises(VerificationError):  # nothing good left: refuse to start (exit 4)
        Agent(d, clock=clock)


def test_predictions_in_flight_during_a_swap_are_still_reported(bundle_v1: Path, bundle_v2: Path, tmp_path: Path,
                                                                clock) -> None:
    agent, publisher, _ = _agent(bundle_v1, tmp_path, clock)
    old_monitor, old_runtime = agent._monitor, agent.model.runtime
    agent.update(bundle_v2)
    # A request that started on the old model finishes after the swap and records into its monitor.
    x = digits_like_inputs(2)
    logits = old_runtime.run(x)
    old_monitor.record(x, logits, logits.argmax(axis=1), None)
    agent.predict(digits_like_inputs(3))
    agent.close_window(clock.advance(10))
    assert agent.forwarder is not None
    agent.forwarder.pump()
    by_model = {(p["model"]["version"], p["n"]) for p in summaries(publisher)}
    assert by_model == {("1.0.0", 2), ("2.0.0", 3)}
    assert len({(p["model"]["sha256"], p["window"]["start"]) for p in summaries(publisher)}) == 2  # distinct keys


def test_concurrent_recording_and_closing_loses_and_doubles_nothing(bundle_v1: Path) -> None:
    import threading

    loaded = load_model(bundle_v1)
    plan, runtime = loaded.runtime.plan, loaded.runtime
    monitor = WindowMonitor(plan, loaded.histogrammer, fleet="f", device="d", model=runtime.info.as_dict(),
                            window_start=0.0, chunk=64)
    x = digits_like_inputs(40, seed=11)
    logits = runtime.run(x)
    classes = logits.argmax(axis=1)
    closed: list[WindowSummary] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            k = int(rng.integers(1, 40))
            monitor.record(x[:k], logits[:k], classes[:k], None)
            written[seed] += k

    def closer() -> None:
        t = 0.0
        while not stop.is_set():
            t += 1.0
            closed.append(monitor.close(t))

    written = dict.fromkeys(range(4), 0)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    closing = threading.Thread(target=closer)
    closing.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    closing.join()
    closed.append(monitor.close(1e6))
    total = sum(written.values())
    assert sum(w.n for w in closed) == total
    assert all((w.counts.sum(axis=1) == w.n).all() for w in closed)
    assert [w.seq for w in closed] == list(range(len(closed)))


def test_a_status_read_while_a_window_closes_never_shows_it_gone_but_uncounted(bundle_v1: Path, clock) -> None:
    """open_n drops to 0 inside the monitor's close; windows_closed must move in the same snapshot, or a
    caller waiting for "every window closed" (the broker-outage test) takes a torn status as final."""
    import threading

    agent = Agent(bundle_v1, window_seconds=10, clock=clock)
    agent.predict(digits_like_inputs(5))
    monitor = agent._monitor
    real_close = monitor.close
    seen: list[dict] = []

    def close_with_a_status_read_in_between(at: float) -> WindowSummary:
        closed = real_close(at)  # from here on the monitor says open_n 0
        reader = threading.Thread(target=lambda: seen.append(agent.status()))
        reader.start()
        reader.join(0.3)  # a status must wait for the count, not slip in before it
        assert not seen, "status() read the counters while the window was half closed"
        return closed

    monitor.close = close_with_a_status_read_in_between  # type: ignore[method-assign]
    assert agent.close_window(clock.advance(10)) is not None
    for _ in range(100):  # the reader finishes once the close is counted
        if seen:
            break
        threading.Event().wait(0.01)
    assert seen
    status = seen[0]
    assert status["window"]["open_n"] == 0 and status["counters"]["windows_closed"] == 1
    assert status["counters"]["predictions"] == 5
