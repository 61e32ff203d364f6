"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from tests.helpers.ray_cluster import ray_cluster  # noqa: F401  (one Ray instance for the session)


@pytest.fixture(autouse=True)
def _quiet_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    # Tests choose their tracking store explicitly; a developer's own server must not receive test runs.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
