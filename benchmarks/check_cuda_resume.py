"""CUDA check of the training loop (run on a machine with a GPU; this VM has none).

Proves on a real GPU what the test suite proves on the CPU, without MLflow/DVC (absent there): the digits
small CNN trained on CUDA with deterministic algorithms, stopped mid-epoch through the SIGTERM path
(checkpoint written, TrainingInterrupted), resumed in a fresh Trainer from the checkpoint, ends bitwise
equal to an uninterrupted CUDA run; CUDA RNG state travels in the checkpoint; the CUDA-trained model
exports to ONNX and matches ONNX Runtime on the held-out split. Also times steps on CUDA and CPU.

Usage: python benchmarks/check_cuda_resume.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edge_kit.config import parse_config  # noqa: E402
from edge_kit.errors import TrainingInterrupted  # noqa: E402
from edge_kit.train.checkpoint import CheckpointManager  # noqa: E402
from edge_kit.train.data import Dataset, fit_preprocessing, split_ids  # noqa: E402
from edge_kit.train.export import export_and_check  # noqa: E402
from edge_kit.train.snapshot import SnapshotInfo  # noqa: E402
from edge_kit.train.trainer import StopFlag, Trainer, deterministic_algorithms, select_device  # noqa: E402

EPOCHS = 4
STOP_AT = 30  # mid-epoch (23 steps per epoch)


def digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    train_ids, test_ids = split_ids(y, 0.2, 0)
    return Dataset(X[train_ids], y[train_ids], X[test_ids], y[test_ids], train_ids, test_ids, "image", (1, 8, 8),
                   [], [str(i) for i in range(10)], fit_preprocessing(X[train_ids], "image"),
                   SnapshotInfo(Path("digits.npz"), "n/a", Path("digits.npz.dvc")))


class StopAtStep(StopFlag):
    """Behaves as if SIGTERM arrived during step ``step``."""

    def __init__(self, trainer: Trainer, step: int) -> None:
        super().__init__()
        self.trainer, self.step = trainer, step

    def __bool__(self) -> bool:
        if self.trainer.position.global_step == self.step:
            self.signal = 15
        return self.signal is not None


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}


def timed_run(trainer: Trainer, **kw: Any) -> float:
    started = time.perf_counter()
    trainer.run(on_epoch=lambda e, m: None, **kw)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(out: Path) -> None:
    config = parse_config({"train": {"epochs": EPOCHS, "lr": 0.003, "checkpoint_every": 10, "device": "auto"},
                           "model": {"kwargs": {"channels": [16, 32], "hidden": 64, "dropout": 0.1}}},
                          Path(tempfile.mkdtemp()) / "edgekit.toml")
    dataset = digits_dataset()
    device = select_device("auto")
    report: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    with deterministic_algorithms(config.train.threads):
        reference = Trainer(config, dataset, device)
        report["uninterrupted_s"] = timed_run(reference, save=lambda: None, stop=StopFlag())
        expected = state_of(reference)

        folder = Path(tempfile.mkdtemp()) / "checkpoints"
        manager = CheckpointManager(folder, keep=3)
        first = Trainer(config, dataset, device)
        try:
            first.run(save=lambda: manager.save(first.state("run", "fp")), stop=StopAtStep(first, STOP_AT),
                      flush=manager.flush, on_epoch=lambda e, m: None)
            raise SystemExit("the simulated SIGTERM did not stop training")
        except TrainingInterrupted as exc:
            report["interrupted"] = str(exc)
        manager.close()
        latest = manager.latest_valid()
        assert latest is not None
        report["resumed_from"] = {"file": latest.path.name, **latest.state["position"]}
        report["cuda_rng_saved"] = "cuda" in latest.state["rng"]
        second = Trainer(config, dataset, device)  # a fresh process would start here
        second.restore(latest.state)
        resumed_manager = CheckpointManager(folder, keep=3)
        timed_run(second, save=lambda: resumed_manager.save(second.state("run", "fp")), stop=StopFlag(),
                  flush=resumed_manager.flush)
        resumed_manager.close()
        resumed = state_of(second)
        report["bitwise_equal"] = all(torch.equal(expected[k], resumed[k]) for k in expected)
        report["max_abs_diff_if_not"] = max(float((expected[k] - resumed[k]).abs().max()) for k in expected)

        x_test = dataset.preprocess(dataset.X_test)
        exported = export_and_check(second.model, dataset.input_shape, out / "cuda_trained.onnx", x_test)
        report["onnx_max_abs_diff"] = exported.max_abs_diff
        logits = second.model.to("cpu")(torch.from_numpy(x_test)).argmax(1).numpy()
        report["test_accuracy"] = float((logits == dataset.y_test).mean())

        cpu = Trainer(config, dataset, torch.device("cpu"))
        report["cpu_uninterrupted_s"] = timed_run(cpu, save=lambda: None, stop=StopFlag())
        report["steps"] = reference.position.global_step
    (out / "cuda_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not report["bitwise_equal"]:
        raise SystemExit("resumed CUDA run differs from the uninterrupted one")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
