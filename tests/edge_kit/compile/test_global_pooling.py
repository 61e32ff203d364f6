"""Spatial ReduceMean -> GlobalAveragePool: exact in fp32, and the pooling then runs in int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from calibration import select_calibration
from edge_kit.compile.evaluate import predict_logits
from edge_kit.compile.fusion import fused_int8_ops
from edge_kit.compile.global_pooling import rewrite_global_pooling
from edge_kit.compile.quantize.ort_quantizer import make_ort_quantizer
from edge_kit.config import QuantizeSection
from tests.helpers.tiny_models import export_onnx


class _PooledCnn(nn.Module):
    """Both spellings of a spatial mean (keepdims 1 and 0) and a channel mean that must stay ReduceMean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        a = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)  # ReduceMean keepdims=1 + Reshape
        b = h.mean(dim=(2, 3))  # ReduceMean keepdims=0
        c = h.mean(dim=1).mean(dim=(1, 2), keepdim=False)  # over channels, then a 3-D tensor: left alone
        return self.fc(torch.cat([a, b], 1)) + c[:, None]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_onnx(_PooledCnn(), torch.randn(2, 3, 8, 8), tmp_path_factory.mktemp("pool") / "fp32.onnx")


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_spatial_means_become_global_average_pools_with_the_same_outputs(pooled: Path, tmp_path: Path) -> None:
    model = onnx.load(str(pooled))
    assert _ops(model).count("ReduceMean") == 4
    rewritten, names = rewrite_global_pooling(model)
    onnx.checker.check_model(rewritten)
    assert len(names) == 2 and _ops(rewritten).count("GlobalAveragePool") == 2
    assert _ops(rewritten).count("ReduceMean") == 2  # the channel mean and the mean of a 3-D tensor
    assert _ops(rewritten).count("Squeeze") == 1  # for the keepdims=0 spelling
    path = tmp_path / "rewritten.onnx"
    onnx.save(rewritten, str(path))
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(predict_logits(path, x), predict_logits(pooled, x), rtol=1e-5, atol=1e-6)
    assert _ops(model).count("ReduceMean") == 4  # the input model is not modified


def test_the_quantized_model_pools_in_int8(pooled: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(64, 3, 8, 8)).astype(np.float32)
    sel = select_calibration(list(range(len(x))), 64, seed=0)
    q = make_ort_quantizer(QuantizeSection(target="auto"), pooled, tmp_path, x, sel, None)
    assert _ops(onnx.load(str(q.fp32_path))).count("GlobalAveragePool") == 2
    assert fused_int8_ops(q.quantize((), "plain"))["QLinearGlobalAveragePool"] == 2
