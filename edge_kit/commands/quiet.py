"""CLI-only log hygiene: the exporter and MLflow narrate things a user cannot act on."""

from __future__ import annotations

import logging
import os


def quiet_third_party(debug: bool) -> None:
    """Call after the command's heavy imports: torch configures its own loggers when it is imported."""
    if debug:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its loggers on import
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms" on every export.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
