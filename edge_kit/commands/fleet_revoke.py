"""`edge-kit fleet revoke DEVICE_ID --ca DIR`: put the device's certificates on the CA's revocation list.

The broker reads the list (`crlfile`) when it starts and when it reloads its configuration; from then
on the device cannot connect. A connection it already has is not cut: restart the broker to drop it.
"""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.fleet.identity import FleetCA

    ca = FleetCA(args.ca)
    serials = ca.revoke(args.device_id)
    if not getattr(args, "json", False):
        print(f"revoked {len(serials)} certificate(s) of {args.device_id!r} (serial {', '.join(serials)}); "
              f"CRL written to {ca.crl_path}: reload the broker (kill -HUP or restart) for it to take effect")
    return {"identity": args.device_id, "revoked_serials": serials, "crl": str(ca.crl_path)}
