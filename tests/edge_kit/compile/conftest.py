"""Tiny models exported once per session for the compiler tests."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import (
    ConcatStretchMlp,
    OutlierMlp,
    TinyCase,
    export_onnx,
    image_data,
    tabular_data,
    trained_cnn,
)


@pytest.fixture(scope="session")
def cnn_case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    x, y = image_data(500, seed=0)
    model = trained_cnn(x[:400], y[:400])
    path = export_onnx(model, torch.from_numpy(x[:2]), tmp_path_factory.mktemp("cnn") / "fp32.onnx")
    return TinyCase(path, x[:400], y[:400], x[400:], y[400:])


@pytest.fixture(scope="session")
def outlier_case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    x, y, w = tabular_data(800, seed=0)
    path = export_onnx(OutlierMlp(w), torch.from_numpy(x[:2]), tmp_path_factory.mktemp("outlier") / "fp32.onnx")
    return TinyCase(path, x[:600], y[:600], x[600:], y[600:])


@pytest.fixture(scope="session")
def stretch_case(tmp_path_factory: pytest.TempPathFactory) -> TinyCase:
    x, y, w = tabular_data(800, seed=0)
    path = export_onnx(ConcatStretchMlp(w), torch.from_numpy(x[:2]), tmp_path_factory.mktemp("stretch") / "fp32.onnx")
    return TinyCase(path, x[:600], y[:600], x[600:], y[600:])
