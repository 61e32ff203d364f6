"""Fixtures of the bench tests: one tiny real pipeline per session (see bench_fixtures)."""

from __future__ import annotations

import pytest

from tests.helpers.bench_fixtures import TinyPipeline, build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))
