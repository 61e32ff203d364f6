"""`edge-kit fleet deploy BUNDLE --server URL --token-file PATH [...]`: start a deployment on a fleet server.

BUNDLE is a local .edgebundle file (uploaded in chunks, then deployed by its sha256), `folder:NAME` for a
bundle already in the server's `--bundles` folder, or an https:// URL (with --sha256; the size, name and
version come from --size/--name/--version). Prints the deployment id (the whole deployment with --json).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
from pathlib import Path
from typing import Any

from edge_kit.errors import UsageError

UPLOAD_CHUNK = 512 * 1024  # base64 of this fits the server's 1 MiB JSON body limit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.commands.fleet_client import FleetClient, describe, issue_view

    client = FleetClient(args.server, args.token_file)
    if args.canary < 1:
        raise UsageError(f"--canary must be at least 1, got {args.canary}")
    if args.canary_windows < 1:
        raise UsageError(f"--canary-windows must be at least 1, got {args.canary_windows}")
    body: dict[str, Any] = {"canary": args.canary, "canary_windows": args.canary_windows,
                            "auto_promote": bool(args.auto_promote)}
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if not devices:
            raise UsageError("--devices must name at least one device id")
        body["devices"] = devices
    if args.seed is not None:
        body["seed"] = args.seed
    body.update(_bundle(client, args))
    view = client.post("/api/deployments", body)
    if not args.json:
        print(view["deployment"])
        if not args.quiet:
            print(describe(view))
    return issue_view(view)


def _bundle(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    bundle: str = args.bundle
    if bundle.startswith("https://"):
        if not (args.sha256 and args.size and args.name and args.version):
            raise UsageError("a bundle URL needs --sha256, --size, --name and --version (the devices check them)")
        return {"url": bundle, "sha256": args.sha256.lower(), "size": args.size, "name": args.name,
                "version": args.version}
    if bundle.startswith("folder:"):
        return {"bundle_path": bundle.removeprefix("folder:")}
    path = Path(bundle)
    if not path.is_file():
        raise UsageError(f"bundle not found: {path} (or give folder:NAME for one in the server's --bundles folder, "
                         "or an https:// URL)")
    return {"bundle_sha256": upload(client, path)}


def upload(client: Any, path: Path) -> str:
    """Upload a bundle in chunks (resuming where the server's copy ends); returns its sha256."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    offset = 0
    while True:
        chunk = data[offset: offset + UPLOAD_CHUNK]
        answer = client.post("/api/bundles", {"sha256": sha, "size": len(data), "offset": offset,
                                              "data": base64.b64encode(chunk).decode()})
        if answer.get("complete"):
            return sha
        offset = int(answer["have"])
        if offset >= len(data):
            raise UsageError(f"the server holds all {len(data)} bytes of {path.name} but did not accept them")
