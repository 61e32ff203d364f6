"""`edge-kit fleet capture-request DEVICE --samples N [--reason TEXT] --server URL --token-file PATH`: ask a
device, over its retained `capture` topic, to capture its next N predicted rows (docs/captures.md).

Prints the request as the fleet published it (the whole message with --json).
"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from edge_kit.errors import UsageError

MAX_SAMPLES = 100_000


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.commands.fleet_client import FleetClient

    if not 1 <= args.samples <= MAX_SAMPLES:
        raise UsageError(f"--samples must be from 1 to {MAX_SAMPLES}, got {args.samples}")
    if not args.device_id or any(ch in args.device_id for ch in "/+#\x00"):
        raise UsageError(f"not a device id: {args.device_id!r} (no '/', '+', '#')")
    client = FleetClient(args.server, args.token_file)
    message: dict[str, Any] = client.post(f"/api/devices/{quote(args.device_id, safe='')}/capture-request",
                                          {"samples": args.samples, "reason": args.reason})
    if not args.json and not args.quiet:
        print(f"capture request {message['request']}: {message['samples']} sample(s) from {message['device']} "
              f"(fleet {message['fleet']}){': ' + message['reason'] if message.get('reason') else ''}")
    return message
