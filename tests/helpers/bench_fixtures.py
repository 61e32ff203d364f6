"""A real, tiny pipeline output for the bench tests, built in code: a PyTorch MLP trained on digits,
its fp32 ONNX export, an int8 QDQ model from ONNX Runtime's quantize_static, and a bundle written
through device_agent.bundle.format.write_bundle (the same writer `edge-kit build` uses)."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FACTORY_SOURCE = '''
import torch


def tiny_mlp(hidden: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
'''


@dataclass(frozen=True)
class TinyPipeline:
    root: Path
    bundle: Path
    fp32_onnx: Path
    int8_onnx: Path
    checkpoint: Path
    x_test: np.ndarray
    y_test: np.ndarray
    factory: str = "bench_tiny_model:tiny_mlp"


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    cut = int(len(x) * 0.8)
    train, test = order[:cut], order[cut:]
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def build_tiny_pipeline(root: Path, *, mlflow_run: dict | None = None) -> TinyPipeline:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from device_agent.bundle.format import write_bundle

    root.mkdir(parents=True, exist_ok=True)
    (root / "bench_tiny_model.py").write_text(FACTORY_SOURCE)
    sys.path.insert(0, str(root))
    try:
        import importlib

        module = importlib.import_module("bench_tiny_model")
        importlib.reload(module)
        torch.manual_seed(0)
        model = module.tiny_mlp()
    finally:
        sys.path.remove(str(root))
    x_train, y_train, x_test, y_test = _digits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    checkpoint = root / "final.pt"
    torch.save({"model": model.state_dict(), "step": 60}, checkpoint)

    fp32 = root / "model-fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (xt[:2],), str(fp32), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": x_train[i : i + 32]} for i in range(0, 256, 32)])

        def get_next(self):  # type: ignore[override]
            return next(self._it, None)

    int8 = root / "model-int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    manifest = {
        "name": "tiny",
        "version": "0.0.1",
        "created_at": "2026-01-01T00:00:00Z",
        "model": {"precision": "int8", "labels": [str(i) for i in range(10)],
                  "inputs": [{"name": "input", "shape": ["batch", 64], "dtype": "float32"}],
                  "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]},
        "provenance": {"mlflow": mlflow_run or {}},
        "quantization": {"backend": "ort", "format": "QDQ", "per_channel": True, "target": "x86-vnni",
                         "excluded_nodes": []},
        "gate": {"metric": "accuracy", "max_drop": 0.01, "passed": True},
    }
    bundle = write_bundle(root / "dist", manifest, {"model.onnx": int8.read_bytes(),
                                                   "report.md": b"# tiny\n"})
    return TinyPipeline(root, bundle, fp32, int8, checkpoint, x_test, y_test)




def load_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def rebundle(bundle: Path, out_dir: Path, **manifest_updates: object) -> Path:
    """A copy of `bundle` with top-level manifest entries replaced (written through write_bundle again)."""
    from device_agent.bundle.format import MANIFEST, SIGNATURE, read_bundle, write_bundle

    b = read_bundle(bundle)
    manifest = {**b.manifest, **manifest_updates}
    members = {k: v for k, v in b.members.items() if k not in (MANIFEST, SIGNATURE)}
    return write_bundle(out_dir, manifest, members)
