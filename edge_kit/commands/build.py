"""`edge-kit build --config C --out DIR (--key KEY | --unsigned) [--backend ort|inc]`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.bundle.signing import load_private_key
    from edge_kit.commands.quiet import quiet_third_party
    from edge_kit.config import load_config
    from edge_kit.ship.build import build

    quiet_third_party(bool(getattr(args, "debug", False)))
    config = load_config(args.config)
    # Load the key first: a wrong key path should fail in a second, not after training.
    key = None if args.unsigned else load_private_key(args.key)
    if args.unsigned:
        log.warning("building an UNSIGNED bundle (--unsigned): agents that require signatures will refuse it")
    # stdout carries exactly one JSON object with --json; tools the pipeline drives (DVC's `add`
    # hints, exporters) print there, so everything they say goes to stderr with the logs.
    with contextlib.redirect_stdout(sys.stderr):
        result = build(config, args.out, signing_key=key, backend=args.backend, tracking_uri=args.tracking_uri)
    if not getattr(args, "json", False):
        g = result.gate
        print(f"{result.bundle}\n  gate passed: {g.metric} fp32 {g.fp32:.4f} -> shipped {g.shipped_metric:.4f} "
              f"(round {g.best.round}, {len(g.best.excluded_nodes)} node(s) and "
              f"{len(g.best.float_tensors)} tensor(s) kept in float)")
    return result.to_json()
