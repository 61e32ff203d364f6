"""`edge-kit verify BUNDLE [--pubkey PUB]`: signature and every hash; exit 4 naming the failing member."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.bundle.format import read_bundle
    from device_agent.bundle.signing import load_public_key

    key = load_public_key(args.pubkey) if args.pubkey else None
    bundle = read_bundle(args.bundle, public_key=key)
    result = {
        "ok": True,
        "bundle": str(bundle.path),
        "name": bundle.name,
        "version": bundle.version,
        "model_sha256": bundle.model_sha256,
        "signed": bundle.signed,
        "signature_checked": key is not None,
        "signed_by": bundle.signed_by,
        "members": sorted(bundle.members),
    }
    if not getattr(args, "json", False):
        how = (f"signature by {bundle.signed_by} and every hash" if key
               else "every hash (no --pubkey: signature not checked)")
        print(f"OK {bundle.path.name}: {how}")
    return result
