"""`edge-kit bench BUNDLE --out DIR [--config C] [--quick]`: int8 vs fp32 vs PyTorch on this host."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from edge_kit.errors import UsageError

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_kit.bench.plan import BenchSettings
    from edge_kit.bench.runner import run_bench
    from edge_kit.bench.sources import plan_for_bundle

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        plan = plan_for_bundle(args.bundle, Path(tmp), settings=settings, config_path=args.config)
        for name, reason in plan.missing.items():
            log.warning("%s not measured: %s", name, reason)
        log.info("benchmarking %s on %d engine(s): %s", plan.bundle.name, len(plan.engines),
                 ", ".join(e.name for e in plan.engines))
        report = run_bench(plan, out)
    log.info("report written to %s", out / report["files"]["report_md"])
    return report
