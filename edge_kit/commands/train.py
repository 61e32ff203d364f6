"""`edge-kit train --config C [--resume auto|never] [--tracking-uri URI] [--ray-address ADDR]`."""

from __future__ import annotations

import argparse
from typing import Any

from edge_kit.commands.quiet import quiet_third_party
from edge_kit.config import load_config


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    from edge_kit.train.run import train  # torch and mlflow load only when a command needs them

    quiet_third_party(bool(getattr(args, "debug", False)))

    result = train(config, resume=args.resume, tracking_uri=args.tracking_uri,
                   ray_address=getattr(args, "ray_address", None))
    return result.to_dict()
