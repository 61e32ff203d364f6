"""`edge-kit keygen --out DIR [--force]`: an Ed25519 key pair for signing bundles."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.bundle.signing import generate_keypair, load_public_key, public_key_fingerprint

    private, public = generate_keypair(args.out, force=args.force)
    fingerprint = public_key_fingerprint(load_public_key(public))
    if not getattr(args, "json", False):
        print(f"private key: {private} (keep it secret)\npublic key:  {public} (give it to the devices)\n"
              f"fingerprint: {fingerprint}")
    return {"private_key": str(private), "public_key": str(public), "fingerprint": fingerprint}
