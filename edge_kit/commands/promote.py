"""`edge-kit promote BUNDLE --pubkey PUB [--tracking-uri URI | --config C]`: make the bundle's registered
version the `champion`.

The bundle must be signed by PUB (exit 4 otherwise): an unsigned file cannot pick the champion. The
MLflow store is never taken from the bundle: the operator's credentials (MLFLOW_TRACKING_TOKEN and
the like, which MLflow sends to the store) go only to a store the operator named.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def tracking_uri(args: argparse.Namespace, bundle_uri: object = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the store of the project --config names."""
    from edge_kit.errors import UsageError

    if args.tracking_uri:
        return str(args.tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if getattr(args, "config", None):
        from edge_kit.config import load_config
        from edge_kit.train.tracking import resolve_tracking_uri

        return resolve_tracking_uri(load_config(args.config))
    named = f" (the bundle says it was built against {bundle_uri!r}; it is not used unless you pass it)" \
        if isinstance(bundle_uri, str) else ""
    raise UsageError("promote needs the MLflow store: pass --tracking-uri URI, set MLFLOW_TRACKING_URI, or "
                     f"--config for the project's own store{named}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.bundle.format import read_bundle
    from device_agent.bundle.signing import load_public_key
    from edge_kit.commands.quiet import quiet_third_party
    from edge_kit.ship.registry import promote_bundle

    quiet_third_party(bool(getattr(args, "debug", False)))
    # Signature and every hash checked: exit 4 on an unsigned, foreign-signed or tampered bundle.
    bundle = read_bundle(args.bundle, public_key=load_public_key(args.pubkey))
    uri = tracking_uri(args, bundle.manifest.get("provenance", {}).get("mlflow", {}).get("tracking_uri"))
    result = promote_bundle(uri, bundle)
    if not getattr(args, "json", False):
        print(f"{result['name']} version {result['version']} is now {result['alias']} "
              f"(was {result['previous'] or 'none'}): {result['model_uri']}")
    return result
