"""Helpers shared by the test suites."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def mlflow_default_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URI for `models:/` loads, put back afterwards.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, so left set it sends every later test's
    training run (which reads that variable) into this test's store.
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
