"""MLflow side of a build: the bundle and its report go to the training run, and the model is
registered as a new version tagged with the gate result, so the registry shows what shipped and why.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUNDLE_ARTIFACTS = "bundle"


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def gate_tags(gate: dict[str, Any], quantization: dict[str, Any]) -> dict[str, str]:
    return {
        "gate.passed": str(bool(gate.get("passed"))).lower(),
        "gate.metric": str(gate.get("metric")),
        "gate.fp32": f"{gate.get('fp32', 0.0):.6f}",
        "gate.int8": f"{gate.get('int8', 0.0):.6f}",
        "gate.drop": f"{gate.get('drop', 0.0):.6f}",
        "gate.max_drop": str(gate.get("max_drop")),
        "gate.rounds": str(len(gate.get("rounds", []))),
        "quantization.backend": str(quantization.get("backend")),
        "quantization.target": str(quantization.get("target")),
        "quantization.excluded_nodes": ",".join(quantization.get("excluded_nodes", [])) or "none",
    }


def log_report(tracking_uri: str, run_id: str, report_md: str) -> None:
    """Log the build report (also when the gate failed: the run then shows why nothing shipped)."""
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.md"
        path.write_text(report_md, encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=BUNDLE_ARTIFACTS)


def log_and_register(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    bundle: Path,
    report_md: str,
    gate: dict[str, Any],
    quantization: dict[str, Any],
    model_sha256: str,
) -> dict[str, Any]:
    """Log bundle + report to the run, log the gate figures, register a model version; returns its name/version."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    client.log_artifact(run_id, str(bundle), artifact_path=BUNDLE_ARTIFACTS)
    log_report(tracking_uri, run_id, report_md)
    for key in ("fp32", "int8", "drop"):
        if isinstance(gate.get(key), int | float):
            client.log_metric(run_id, f"gate_{gate.get('metric', 'metric')}_{key}", float(gate[key]))
    client.set_tag(run_id, "edgekit.bundle_sha256", model_sha256)
    client.set_tag(run_id, "edgekit.gate_passed", str(bool(gate.get("passed"))).lower())
    try:
        client.create_registered_model(model_name, description="int8 edge bundles built by edge-kit")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{BUNDLE_ARTIFACTS}/{bundle.name}"
    tags = gate_tags(gate, quantization) | {"bundle.model_sha256": model_sha256, "bundle.file": bundle.name}
    version = client.create_model_version(model_name, source, run_id=run_id, tags=tags)
    log.info("registered %s version %s in the MLflow model registry", model_name, version.version)
    return {"name": model_name, "version": str(version.version), "source": source}
