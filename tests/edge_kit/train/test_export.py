"""fp32 ONNX export: names, dynamic batch, parity with PyTorch, and a mismatch that fails the build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_kit.train.export import ExportMismatchError, check_parity, export_and_check, export_onnx
from edge_kit.train.models import mlp, small_cnn

pytestmark = pytest.mark.slow  # the torch.export-based exporter takes a few seconds


def test_cnn_export_matches_pytorch_at_any_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_cnn((1, 8, 8), 10).eval()
    inputs = np.random.default_rng(0).normal(size=(37, 1, 8, 8)).astype(np.float32)
    result = export_and_check(model, (1, 8, 8), tmp_path / "m.onnx", inputs)
    assert result.max_abs_diff <= 1e-4 and result.samples == 37
    graph = onnx.load(str(result.path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # symbolic: dynamic batch
    types = {i.name: i.data_type for i in graph.initializer}
    weights = [n for n in types if types[n] != onnx.TensorProto.INT64]  # int64 ones are shapes
    assert len(weights) == 8 and all(types[n] == onnx.TensorProto.FLOAT for n in weights)  # fp32, 4 layers
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 37):
        out = session.run(["logits"], {"input": inputs[:batch]})[0]
        expected = model(torch.from_numpy(inputs[:batch])).detach().numpy()
        assert out.shape == (batch, 10) and np.max(np.abs(out - expected)) <= 1e-4


def test_mismatch_fails_and_the_file_is_set_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = mlp((6,), 3).eval()
    inputs = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    path = export_onnx(model, (6,), tmp_path / "m.onnx")
    assert check_parity(model, path, inputs).max_abs_diff <= 1e-4
    with torch.no_grad():  # the PyTorch model moves on; the exported graph no longer matches it
        model[-1].bias.add_(0.5)
    with pytest.raises(ExportMismatchError, match=r"disagrees with PyTorch: max abs difference 0\.5"):
        check_parity(model, path, inputs)

    import edge_kit.train.export as export

    real = export.check_parity

    def drift_after_export(m: torch.nn.Module, p: Path, x: np.ndarray, tol: float = 1e-4):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            m[-1].bias.add_(1.0)
        return real(m, p, x, tol)

    monkeypatch.setattr(export, "check_parity", drift_after_export)
    with pytest.raises(ExportMismatchError):
        export.export_and_check(model, (6,), tmp_path / "n.onnx", inputs)
    assert not (tmp_path / "n.onnx").exists() and (tmp_path / "n.rejected.onnx").exists()
