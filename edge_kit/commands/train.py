"""`edge-kit train --config C [--resume auto|never] [--tracking-uri URI]`."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from edge_kit.config import load_config


def quiet_third_party(debug: bool) -> None:
    """CLI-only: the exporter and MLflow narrate at INFO/WARNING about things a user cannot act on."""
    if debug:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its loggers on import
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    quiet_third_party(bool(getattr(args, "debug", False)))
    from edge_kit.train import train  # torch and mlflow load only when a command needs them

    if not getattr(args, "debug", False):
        # torch configures its own loggers on import; "torchvision is not installed" is not the user's concern.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    result = train(config, resume=args.resume, tracking_uri=args.tracking_uri)
    return result.to_dict()
