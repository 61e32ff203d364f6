"""Whether each MQTT consumer of this server is connected, readable by the HTTP side.

Consumers run in their own processes (`fleet serve --workers N`), so their state lives in shared
memory made by the parent before it spawns them: one slot per worker, written only by that
worker (so no lock), read by `/metrics`, `/healthz` and the dashboard. A worker that dies is marked
disconnected by the parent, so a crashed consumer never looks connected.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


class ConsumerState:
    def __init__(self, workers: int, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self.workers = workers
        # Raw shared arrays: single-writer slots need no lock, and they pickle into spawned workers.
        self._connected = ctx.RawArray("b", workers)
        self._reconnects = ctx.RawArray("q", workers)

    def set_connected(self, worker: int, connected: bool) -> None:
        self._connected[worker] = 1 if connected else 0

    def count_reconnect(self, worker: int) -> None:
        self._reconnects[worker] += 1

    def connected(self, worker: int) -> bool:
        return bool(self._connected[worker])

    @property
    def ready(self) -> bool:
        """Every consumer is connected: anything less and summaries may wait unread at the broker."""
        return all(self._connected[i] for i in range(self.workers))

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"worker": i, "connected": bool(self._connected[i]), "reconnects": int(self._reconnects[i])}
                for i in range(self.workers)]
