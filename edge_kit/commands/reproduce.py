"""`edge-kit reproduce BUNDLE --config C`: exit 0 if the rebuild is byte-identical, 4 with a diff otherwise."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from edge_kit.errors import EXIT_VERIFICATION


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.commands.quiet import quiet_third_party
    from edge_kit.config import load_config
    from edge_kit.ship.reproduce import reproduce

    quiet_third_party(bool(getattr(args, "debug", False)))

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one JSON object
        result = reproduce(args.bundle, load_config(args.config))
    out = result.to_json()
    if result.identical:
        if not getattr(args, "json", False):
            print(f"identical: model.onnx sha256 {result.original_sha256}")
        return out
    if not getattr(args, "json", False):
        print("NOT identical:\n  " + "\n  ".join(result.diff))
    out["exit_code"] = EXIT_VERIFICATION
    return out
