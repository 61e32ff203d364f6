"""The retraining command the fleet server runs when an operator approves a drift alert.

    python -m edge_kit.demo.retrain --config PROJECT/edgekit.toml --bundles DIR --key KEY --server URL
        [--min-labelled N] [--wait S] [--canary-seed S]

The chain an operator would run by hand, each step the real command (docs/captures.md):

1. wait until the devices flagged for data drift hold `--min-labelled` labelled captures each at the fleet
   (the approval asked them for more: `[captures] request_on_alert`), or `--wait` seconds pass;
2. `edge-kit fleet captures export --labelled-only --devices <flagged>`: their captured inputs and labels;
3. `edge-kit data add`: a new DVC snapshot of the project's field data, committed to git;
4. `edge-kit build` of the next version (the training seed bumped too): trains on base + field rows, gates,
   signs, and writes the bundle into the fleet server's `--bundles` folder;
5. `edge-kit fleet deploy folder:<bundle>`: one canary, then every device once the canary passes.

The fleet token comes from EDGEKIT_FLEET_TOKEN (the fleet server passes its environment on).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edge_kit.demo.processes import http_json
from edge_kit.demo.project import build_bundle, config_value, next_version, run_command, set_config_value
from edge_kit.errors import EdgeKitError

log = logging.getLogger("retrain")


def flagged_devices(server: str) -> list[str]:
    """Devices with a device-level data drift alert (open, pending or approved)."""
    alerts = _get(server, "/api/alerts").get("alerts", [])
    return sorted({str(a["scope"]).split(":", 1)[1] for a in alerts
                   if str(a.get("scope", "")).startswith("device:") and a.get("kind") == "data_drift"})


def labelled_counts(server: str) -> dict[str, int]:
    """Labelled captures the fleet holds, per device (all model versions)."""
    counts: dict[str, int] = {}
    for row in _get(server, "/api/captures/counts").get("counts", []):
        counts[str(row["device"])] = counts.get(str(row["device"]), 0) + int(row.get("labelled", 0))
    return counts


def wait_for_captures(server: str, devices: list[str], minimum: int, wait_s: float) -> dict[str, int]:
    deadline = time.monotonic() + wait_s
    while True:
        counts = labelled_counts(server)
        if all(counts.get(d, 0) >= minimum for d in devices) or time.monotonic() >= deadline:
            return {d: counts.get(d, 0) for d in devices}
        time.sleep(2.0)


def _get(server: str, path: str) -> dict[str, Any]:
    """GET a fleet API path with the operator token from EDGEKIT_FLEET_TOKEN; EdgeKitError when it fails."""
    try:
        doc: dict[str, Any] = http_json(f"{server.rstrip('/')}{path}")
    except (RuntimeError, OSError, ValueError) as exc:  # refused, unreachable, or not JSON
        raise EdgeKitError(f"the fleet server at {server} did not answer {path}: {exc}") from exc
    return doc


def _edge_kit(args: list[str], cwd: Path, what: str, log_file: Path) -> dict[str, Any]:
    out = run_command([sys.executable, "-m", "edge_kit", *args, "--json"], cwd, what, log=log_file)
    doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--bundles", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--server", required=True, help="the fleet server's URL")
    p.add_argument("--min-labelled", type=int, default=300, help="labelled captures to wait for per flagged device")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait for them at most")
    p.add_argument("--canary-seed", type=int, help="seed of the canary draw")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s retrain: %(message)s")
    project = args.config.parent
    log_file = project / "retrain.log"
    try:
        devices = flagged_devices(args.server)
        log.info("flagged devices: %s; waiting for %d labelled captures each", ", ".join(devices) or "none",
                 args.min_labelled)
        held = wait_for_captures(args.server, devices, args.min_labelled, args.wait)
        log.info("labelled captures held: %s", held)
        export_dir = project / "field-export"
        export = _edge_kit(["fleet", "captures", "export", "--server", args.server, "--out", str(export_dir),
                            "--labelled-only", *(["--devices", ",".join(devices)] if devices else [])],
                           project, "edge-kit fleet captures export", log_file)
        # The new version and seed first, so `data add` commits them with the field data: the build then
        # runs on a clean commit that names both.
        version = next_version(config_value(args.config, "project", "version") or "1.0.0")
        seed = int(config_value(args.config, "train", "seed") or 0) + 1
        set_config_value(args.config, "project", "version", version)
        set_config_value(args.config, "train", "seed", seed)
        added = _edge_kit(["data", "add", str(export_dir), "--config", str(args.config)], project,
                          "edge-kit data add", log_file)
        log.info("building version %s (training seed %d) on base + field data", version, seed)
        built = build_bundle(args.config, args.bundles, args.key, log_file)
        deploy_args = ["fleet", "deploy", f"folder:{Path(str(built['bundle'])).name}", "--server", args.server,
                       "--canary", "1", "--canary-windows", "2", "--auto-promote"]
        if args.canary_seed is not None:
            deploy_args += ["--seed", str(args.canary_seed)]
        deployed = _edge_kit(deploy_args, project, "edge-kit fleet deploy", log_file)
    except EdgeKitError as exc:
        print(f"retrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"version": version, "captures_held": held, "export": export, "data_add": added,
                      "deployment": deployed.get("deployment"), **built}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
