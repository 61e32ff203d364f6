"""Training: seeded, deterministic, resumable PyTorch training tracked in MLflow, ending in a checked fp32 ONNX.

(Interface first; the implementation follows in the next commits.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_kit.config import Config

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    checkpoint: Path  # final .pt
    onnx: Path  # fp32 ONNX, dynamic batch, input "input", output "logits"
    metrics: dict[str, Any]  # final test accuracy etc.
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.tracking_uri,
            "checkpoint": str(self.checkpoint),
            "onnx": str(self.onnx),
            "metrics": self.metrics,
            "reused": self.reused,
        }


def train(config: Config, *, resume: str = "auto", tracking_uri: str | None = None,
          reuse: bool = False) -> TrainResult:
    """Train (or with reuse=True return an identical finished run) and export the fp32 ONNX."""
    raise NotImplementedError("training lands in the next commit")


def load_model(config: Config, checkpoint: Path) -> torch.nn.Module:
    """Rebuild the module a checkpoint holds, in eval mode; UsageError if it is of a different model."""
    raise NotImplementedError("training lands in the next commit")
