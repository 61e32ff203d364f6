"""Log a benchmark to the bundle's MLflow run (manifest provenance.mlflow), when that run is reachable.

Unreachable is normal (a bundle benchmarked on another machine than the one it was built on), so
every failure here is reported in the result, never raised. A SQLite or file store that does not
exist is treated as unreachable: MLflow would otherwise create an empty one at that path.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

ARTIFACT_PATH = "bench"
CONNECT_TIMEOUT_S = 3.0


def run_location(manifest: dict[str, Any]) -> tuple[str | None, str | None]:
    mlflow_info = (manifest.get("provenance") or {}).get("mlflow") or {}
    return mlflow_info.get("tracking_uri"), mlflow_info.get("run_id")


def unreachable_reason(tracking_uri: str) -> str | None:
    """Why the tracking store cannot be used from here, or None if it looks reachable (cheap checks only)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = tracking_uri.removeprefix("sqlite:///")  # "/abs.db" (from sqlite:////abs.db) or cwd-relative
        if db and db != ":memory:" and not Path(db).exists():
            return f"tracking database {db} does not exist on this machine"
        return None
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else tracking_uri)
        return None if path.exists() else f"tracking folder {path} does not exist on this machine"
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname or "localhost", port), timeout=CONNECT_TIMEOUT_S):
                return None
        except OSError as exc:
            return f"tracking server {parsed.hostname}:{port} not reachable: {exc}"
    return None


def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: bench.<engine>.<figure>."""
    out: dict[str, float] = {}
    for name, e in report["engines"].items():
        prefix = f"bench.{name}"
        for lat in e["latency_ms"]:
            for pct in ("p50", "p95", "p99"):
                out[f"{prefix}.latency_{pct}_ms.t{lat['threads']}"] = lat[pct]
        for t in e["throughput"]:
            out[f"{prefix}.items_per_s.b{t['batch']}.t{t['threads']}"] = t["items_per_s"]
        out[f"{prefix}.model_bytes"] = float(e["model_bytes"])
        out[f"{prefix}.peak_rss_mb"] = e["peak_rss_mb"]
        if e.get("accuracy") is not None:
            out[f"{prefix}.accuracy"] = e["accuracy"]
    return out


def log_metrics(manifest: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    tracking_uri, run_id = run_location(manifest)
    status: dict[str, Any] = {"logged": False, "tracking_uri": tracking_uri, "run_id": run_id,
                              "artifact_path": ARTIFACT_PATH}
    if not tracking_uri or not run_id:
        return {**status, "reason": "the bundle's manifest names no MLflow run (provenance.mlflow)"}
    reason = unreachable_reason(tracking_uri)
    if reason:
        log.info("not logging to MLflow: %s", reason)
        return {**status, "reason": reason}
    # Keep a dead server from stalling the command for minutes in MLflow's retry loop.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        client.get_run(run_id)
        import time

        now = int(time.time() * 1000)
        host = report["host"]
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics_of(report).items())],
            tags=[RunTag("bench.host.cpu", str(host.get("cpu"))),
                  RunTag("bench.host.int8_isa", str(host.get("int8_isa"))),
                  RunTag("bench.int8_slower_than_fp32",
                         str(any(f["code"] == "int8_slower_than_fp32" for f in report["flags"])).lower())],
        )
    except Exception as exc:  # MLflow raises many types (REST, SQL, missing run): all mean "not logged"
        log.warning("could not log the benchmark to MLflow run %s: %s", run_id, exc)
        return {**status, "reason": f"{type(exc).__name__}: {exc}"}
    return {**status, "logged": True}


def log_artifacts(status: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=status["tracking_uri"]).log_artifacts(status["run_id"], str(out_dir), ARTIFACT_PATH)
    except Exception as exc:
        log.warning("could not upload the benchmark report to MLflow run %s: %s", status["run_id"], exc)
        return {**status, "logged": False, "reason": f"metrics logged, artifacts failed: {type(exc).__name__}: {exc}"}
    return status
