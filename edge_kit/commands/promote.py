"""`edge-kit promote BUNDLE [--tracking-uri URI]`: make the bundle's registered version the `champion`."""

from __future__ import annotations

import argparse
import os
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.bundle.format import read_bundle
    from edge_kit.commands.quiet import quiet_third_party
    from edge_kit.errors import UsageError
    from edge_kit.ship.registry import promote

    quiet_third_party(bool(getattr(args, "debug", False)))
    bundle = read_bundle(args.bundle)  # every hash checked: exit 4 on a tampered bundle
    uri = (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or bundle.manifest.get("provenance", {}).get("mlflow", {}).get("tracking_uri"))
    if not uri:
        raise UsageError("the bundle names no MLflow tracking store: pass --tracking-uri")
    result = promote(uri, bundle.name, bundle.model_sha256)
    if not getattr(args, "json", False):
        print(f"{result['name']} version {result['version']} is now {result['alias']} "
              f"(was {result['previous'] or 'none'}): {result['model_uri']}")
    return result
