"""Fixtures shared by the whole suite: the CLIs as subprocesses and a real Mosquitto broker.

The helpers behind them (ports, CLI runs, the broker process) live in `harness.processes`, which the
benchmarks use too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.processes import REPO_ROOT, CliResult, MosquittoBroker, run_cli

__all__ = ["REPO_ROOT"]


@pytest.fixture
def edge_kit_cli():
    def _run(*args: str, **kw) -> CliResult:
        return run_cli("edge_kit", *args, **kw)
    return _run


@pytest.fixture
def edge_agent_cli():
    def _run(*args: str, **kw) -> CliResult:
        return run_cli("device_agent", *args, **kw)
    return _run


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker_dir = tmp_path / "mosquitto"
    broker_dir.mkdir()
    broker = MosquittoBroker(broker_dir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
