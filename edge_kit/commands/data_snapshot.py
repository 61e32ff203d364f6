"""`edge-kit data snapshot --config PATH`: materialise the project's data snapshot and check it against its record."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.config import load_config
    from edge_kit.train.data import materialise_snapshot

    info = materialise_snapshot(load_config(args.config))
    if not getattr(args, "json", False):
        print(f"OK {info.path}: md5 {info.dvc_md5} (record {info.dvc_file.name})")
    return {"ok": True, **info.to_dict()}
