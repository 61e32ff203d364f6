"""`edge-kit data add DIR --config PATH [--no-commit]`: an export's labelled captures become the project's field data.

The work is `edge_kit.train.field_data.add_field_data` (docs/captures.md, "Export, snapshot, retrain").
"""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.train.field_data import add_field_data

    result = add_field_data(args.config, args.export_dir, commit=not args.no_commit)
    if not getattr(args, "json", False):
        if not result["added"]:
            print(f"{result['field']}: nothing added ({result['skipped_duplicates']} records already there, "
                  f"{result['skipped_unlabelled']} unlabelled skipped)")
        else:
            devices = ", ".join(f"{d} {n}" for d, n in result["devices"].items())
            print(f"{result['field']}: {result['added']} rows added ({devices}), {result['rows']} in all; "
                  f"skipped {result['skipped_duplicates']} already there and {result['skipped_unlabelled']} "
                  f"unlabelled; md5 {result['md5']} ({result['dvc_file']})")
            print(f"committed {result['commit'][:12]}" if result["committed"]
                  else f"not committed: {result['reason']}")
    return result
