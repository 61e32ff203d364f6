"""What a benchmark run measures: the engines, the held-out data and the repetition settings.

Everything here is plain data that can be written to JSON, because each engine is measured by a
child process that reads its job from a file (see `worker`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INT8 = "int8"
FP32 = "fp32"
PYTORCH = "pytorch"
ENGINE_ORDER = (INT8, FP32, PYTORCH)


def default_thread_counts() -> tuple[int, ...]:
    cores = os.cpu_count() or 1
    return tuple(sorted({1, cores}))


@dataclass(frozen=True)
class BenchSettings:
    """Warm-up and repetitions. `quick` trades precision for time (smoke tests, CI)."""

    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    thread_counts: tuple[int, ...] = field(default_factory=default_thread_counts)
    warmup: int = 20
    latency_repeats: int = 300  # batch-1 calls timed per thread count (enough samples for a p99)
    throughput_repeats: int = 30  # timed calls per (batch size, thread count)
    accuracy_batch: int = 256

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(batch_sizes=(1, 32), warmup=3, latency_repeats=60, throughput_repeats=5)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")
        if not self.thread_counts or min(self.thread_counts) < 1:
            raise ValueError(f"thread counts must be positive, got {self.thread_counts}")
        if self.latency_repeats < 1 or self.throughput_repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be at least 1 and warm-up at least 0")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TorchModelSpec:
    """How a child process rebuilds the PyTorch model of a checkpoint.

    With `config`, the training pipeline's own loader is used (`edge_kit.train.models.load_trained_model`), so the
    model is built exactly as it was trained. Otherwise `factory` ("module:function", importable
    from `import_paths`) builds it and the checkpoint's weights are loaded into it.
    """

    checkpoint: Path
    config: Path | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    import_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.config is None and self.factory is None:
            raise ValueError("a TorchModelSpec needs either a config or a factory")

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "config": str(self.config) if self.config else None,
            "factory": self.factory,
            "kwargs": self.kwargs,
            "import_paths": list(self.import_paths),
        }


@dataclass(frozen=True)
class EngineSpec:
    """One engine to measure: an ONNX file run by ONNX Runtime, or a PyTorch model in eager mode."""

    name: str
    onnx: Path | None = None
    torch: TorchModelSpec | None = None
    source: str | None = None  # where the model came from, in words, when `onnx` is a temporary copy
    # The model standardises its own inputs (a bundle with `model.preprocessing.in_graph`): it is fed
    # the raw test inputs, as a device feeds it, not the preprocessed ones the fp32 and torch models take.
    raw_inputs: bool = False

    def __post_init__(self) -> None:
        if (self.onnx is None) == (self.torch is None):
            raise ValueError(f"engine {self.name}: give exactly one of onnx or torch")

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    @property
    def model_file(self) -> Path:
        """The file whose size is reported: the ONNX model, or the PyTorch checkpoint."""
        if self.onnx is not None:
            return self.onnx
        assert self.torch is not None
        return self.torch.checkpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runtime": self.runtime,
            "onnx": str(self.onnx) if self.onnx else None,
            "torch": self.torch.to_json() if self.torch else None,
            "source": self.source or str(self.model_file),
            "inputs": "x_raw" if self.raw_inputs else "x",
        }


@dataclass(frozen=True)
class EvalData:
    """Model-ready (already preprocessed) inputs, with class indices when the split has labels.

    `x_raw` are the same samples before preprocessing, for a model that preprocesses inside its graph
    (None where the data has no preprocessing step, e.g. synthetic inputs: then `x` serves both).
    `source` says in words where the data came from, for the report.
    """

    x: np.ndarray
    y: np.ndarray | None
    source: str
    x_raw: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) == 0:
            raise ValueError("test data is empty")
        if self.y is not None and len(self.y) != len(self.x):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")


@dataclass(frozen=True)
class BenchPlan:
    """Everything one `edge-kit bench` run needs.

    `missing` maps an engine that could not be set up to the reason; `notes` say how sources were found.
    """

    bundle: Path
    manifest: dict[str, Any]
    engines: tuple[EngineSpec, ...]
    data: EvalData
    settings: BenchSettings
    missing: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
