"""The consumer supervisor of `fleet serve`: restart backoff that resets, and never a blocking sleep."""

from __future__ import annotations

from edge_kit.commands.fleet_serve import Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_while_crashing_and_resets_after_a_healthy_period() -> None:
    clock = Clock()
    sup = Supervisor(2, clock)
    delays = []
    for _ in range(6):  # a worker dying at once, again and again
        delays.append(sup.exited(0))
        assert not sup.due(0)  # scheduled, not slept: the caller keeps handling signals meanwhile
        clock.now += delays[-1]
        assert sup.due(0) and not sup.due(0)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert sup.restarts == 6
    # Up and healthy for a minute: the next crash restarts after the shortest delay again.
    clock.now += Supervisor.HEALTHY_SECONDS
    sup.alive(0)
    assert sup.exited(0) == 1.0
    # The other worker's backoff is its own.
    assert sup.exited(1) == 1.0
