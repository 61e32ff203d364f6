"""The retraining command the fleet server runs when an operator approves a drift alert.

    python -m edge_kit.demo.retrain --config PROJECT/edgekit.toml --bundles DIR --key KEY

It bumps the project's version (and the training seed, so the new version is a new model) and runs the
real `edge-kit build` on the project's data snapshot, which writes the signed bundle of the new version
into the folder the agents and the fleet server watch: the agents verify, self-test and hot-swap it.
In a real project the labelled field data would be added to the snapshot first (`dvc add`, then
`dvc repro` or this build); the demo keeps the snapshot, so the devices whose inputs are shifted stay
flagged against the new version too: retraining on the same data does not move a camera back.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_kit.demo.project import build_bundle, config_value, next_version, set_config_value
from edge_kit.errors import EdgeKitError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s retrain: %(message)s")
    try:
        version = next_version(config_value(args.config, "project", "version") or "1.0.0")
        seed = int(config_value(args.config, "train", "seed") or 0) + 1
        set_config_value(args.config, "project", "version", version)
        set_config_value(args.config, "train", "seed", seed)
        logging.info("building version %s (training seed %d)", version, seed)
        result = build_bundle(args.config, args.bundles, args.key, args.config.parent / "retrain.log")
    except EdgeKitError as exc:
        print(f"retrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"version": version, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
