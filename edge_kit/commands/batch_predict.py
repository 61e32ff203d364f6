"""`edge-kit batch-predict BUNDLE --input PATH_OR_GLOB --output DIR [--ray-address ADDR] [--pubkey PUB]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_kit.commands.quiet import quiet_third_party


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.ship.batch_predict import batch_predict

    quiet_third_party(bool(getattr(args, "debug", False)))
    result = batch_predict(Path(args.bundle), args.input, Path(args.output), pubkey=args.pubkey,
                           actors=args.actors, address=args.ray_address)
    if not getattr(args, "json", False):
        print(f"{result['scored']} shards scored ({result['rows']} rows), {result['skipped']} already done; "
              f"outputs in {result['output']}")
    return result
