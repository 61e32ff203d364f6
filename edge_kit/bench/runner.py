"""Run a benchmark plan: one child process per engine, a progress bar, then the report files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import edge_kit
from device_agent.host import host_info
from edge_kit.bench.plan import BenchPlan, EngineSpec
from edge_kit.bench.worker import progress_steps
from edge_kit.errors import EdgeKitError

log = logging.getLogger(__name__)

# A worker that closed its output but has not exited after this long is killed.
WORKER_TIMEOUT_S = 60


class WorkerFailed(EdgeKitError):
    """An engine could not be measured (it failed to load or to run the test data)."""


def measure_engines(plan: BenchPlan, workdir: Path, *,
                    progress: bool | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Figures per engine name, and the error of each engine that could not be measured."""
    data_path = workdir / "test-data.npz"
    arrays: dict[str, np.ndarray] = {"x": plan.data.x, "x_raw": plan.data.x if plan.data.x_raw is None
                                     else plan.data.x_raw}
    if plan.data.y is not None:
        arrays["y"] = plan.data.y
    np.savez(data_path, **arrays)  # type: ignore[arg-type]
    settings = plan.settings.to_json()
    steps = progress_steps(settings)
    figures: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    # progress=None: a bar on a terminal, nothing in logs and pipes (tqdm's own rule).
    with tqdm(total=steps * len(plan.engines), desc="bench", unit="step", file=sys.stderr,
              disable=None if progress is None else not progress) as bar:
        for i, engine in enumerate(plan.engines):
            bar.set_postfix_str(engine.name)
            job = workdir / f"job-{engine.name}.json"
            job.write_text(json.dumps({**engine.to_json(), "data": str(data_path), "settings": settings}))
            try:
                figures[engine.name] = {
                    **_run_worker(job, engine, bar, workdir),
                    "model_file": engine.source or str(engine.model_file),
                    "model_bytes": engine.model_file.stat().st_size,
                }
            except WorkerFailed as exc:
                failures[engine.name] = str(exc)
                bar.n = steps * (i + 1)  # keep the bar honest about what is left
                bar.refresh()
    return figures, failures


def _run_worker(job: Path, engine: EngineSpec, bar: tqdm, workdir: Path) -> dict[str, Any]:
    env = dict(os.environ)
    # The worker must import this same edge_kit checkout, wherever the caller's cwd is.
    package_root = str(Path(edge_kit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    stderr_path = workdir / f"worker-{engine.name}.log"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_kit.bench.worker", str(job)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a library printed to stdout; not ours
                if event.get("event") == "progress":
                    bar.update(1)
                elif event.get("event") == "result":
                    result = event["figures"]
                elif event.get("event") == "error":
                    error = str(event.get("message"))
            proc.wait(timeout=WORKER_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if result is None:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        detail = error or (" | ".join(tail) if tail else f"worker exited with status {proc.returncode}")
        raise WorkerFailed(f"engine {engine.name} ({engine.model_file.name}) could not be measured: {detail}")
    return result


def run_bench(plan: BenchPlan, out_dir: str | Path, *, progress: bool | None = None,
              log_to_mlflow: bool = True) -> dict[str, Any]:
    """Measure every engine of `plan`, write report.json, report.md and charts into `out_dir`; return the report.

    An engine other than int8 that fails is reported under `missing` (and the others still run); if the
    int8 model itself cannot be measured, WorkerFailed is raised.
    """
    from edge_kit.bench.charts import write_charts
    from edge_kit.bench.report import build_report, write_report
    from edge_kit.bench.tracking import log_artifacts, log_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        figures, failures = measure_engines(plan, Path(tmp), progress=progress)
    if "int8" in failures:
        raise WorkerFailed(failures["int8"])
    for message in failures.values():
        log.warning("%s", message)
    missing = {**plan.missing, **failures}
    report = build_report(plan, figures, missing, host_info())
    report["files"]["charts"] = [p.name for p in write_charts(report, out)]
    for flag in report["flags"]:
        if flag["level"] == "warning":
            log.warning("%s (likely: %s)", flag["message"], "; ".join(flag["reasons"]))
    if log_to_mlflow:
        # Metrics first: they tell whether the run is reachable, and the report says so before it is uploaded.
        report["mlflow"] = log_metrics(plan.manifest, report)
    write_report(report, out)
    if report["mlflow"].get("logged"):
        report["mlflow"] = log_artifacts(report["mlflow"], out)
        if not report["mlflow"]["logged"]:
            write_report(report, out)
    return report
