"""`edge-kit fleet captures export --server URL --out DIR [...]`: the fleet's captures as `.npz` shards.

The paging and the files are `edge_kit.fleet.captures_export`; this wires in the operator's HTTP client.
Every failure of the server (an answer 4xx or 5xx, no answer, an answer that is not an export page) is
ServerError, exit 1, with the server's own message (docs/captures.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_kit.commands.fleet_client import FleetClient, ServerError
from edge_kit.errors import UsageError


def export(server: str, out: str | Path, *, token_file: str | None = None, devices: Sequence[str] | None = None,
           since: str | float | None = None, labelled_only: bool = False, labels_csv: str | Path | None = None,
           shard_records: int = 10_000, page_limit: int | None = None) -> dict[str, Any]:
    """Export the captures a running `fleet serve` holds into `out` (replaced); the manifest written.

    `since`: unix seconds or ISO 8601. The operator token comes from `token_file`, else $EDGEKIT_FLEET_TOKEN."""
    from edge_kit.fleet.captures_export import PAGE_LIMIT, ExportProtocolError, export_captures, parse_since

    client = FleetClient(server, token_file)
    when = since if isinstance(since, float | int) or since is None else parse_since(since)

    def get(path: str) -> Any:
        try:
            return client.get(path)
        except UsageError as exc:  # an answer 4xx: the server refused (the token, a filter)
            raise ServerError(exc.message, hint=exc.hint) from exc

    try:
        return export_captures(get, out, server=client.base, devices=devices, since=when,
                               labelled_only=labelled_only, labels_csv=labels_csv, shard_records=shard_records,
                               page_limit=page_limit or PAGE_LIMIT)
    except ExportProtocolError as exc:
        raise ServerError(str(exc)) from exc


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.captures_command != "export":
        raise UsageError(f"unknown captures subcommand {args.captures_command!r}")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    manifest = export(args.server, args.out, token_file=args.token_file, devices=devices, since=args.since,
                      labelled_only=args.labelled_only, labels_csv=args.labels_csv, shard_records=args.shard_records)
    if not getattr(args, "json", False):
        counts = manifest["counts"]["devices"]
        per = ", ".join(f"{d} {c['records']} ({c['labelled']} labelled)" for d, c in counts.items())
        print(f"{args.out}: {manifest['records']} records in {len(manifest['shards'])} shard(s), "
              f"{manifest['labelled']} labelled; {per or 'no devices'}")
    return {"out": str(args.out), **manifest}
