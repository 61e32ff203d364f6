"""`edge-kit fleet rollout ID --server URL --token-file PATH [--promote | --halt | --rollback]`: show or change
a deployment (state, every device's version and step, the canary's figures)."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.commands.fleet_client import FleetClient, describe, issue_view

    client = FleetClient(args.server, args.token_file)
    dep = args.deployment
    action = "promote" if args.promote else "halt" if args.halt else "rollback" if args.rollback else None
    view = client.post(f"/api/deployments/{dep}/{action}", {}) if action else client.get(f"/api/deployments/{dep}")
    if not args.json and not args.quiet:
        print(describe(view))
    return issue_view(view)
