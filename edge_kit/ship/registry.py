"""MLflow side of a build: the int8 model is registered in MLflow's ONNX flavor, with the bundle and
its report as artifacts of the same run, and aliases say which version is which.

- The registered version's source is `runs:/<run>/int8_model`: an MLflow model (ONNX flavor, input
  and output signature from the bundle's manifest), so `mlflow.onnx.load_model`, `mlflow.pyfunc` and
  `mlflow models serve` load it; the `.edgebundle` (what devices run) and `report.md` sit beside it under
  `bundle/`, and the version's tags name them and carry the gate's figures.
- Aliases move: `candidate` to every version whose build passed the gate; `champion` when an operator
  promotes one (`edge-kit promote BUNDLE --pubkey PUB`), and only for a bundle whose signature was
  verified. `models:/<name>@champion` is what ships.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device_agent.bundle.format import Bundle

log = logging.getLogger(__name__)

BUNDLE_ARTIFACTS = "bundle"
MODEL_ARTIFACTS = "int8_model"  # not "model/": the training run keeps its fp32 files there
CANDIDATE = "candidate"
CHAMPION = "champion"


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
        "quantization.float_tensors": ",".join(quantization.get("float_tensors", [])) or "none",
    }


def model_signature(model: dict[str, Any]) -> Any:
    """An MLflow tensor signature from the manifest's `model.inputs`/`outputs` (symbolic dims become -1)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def schema(specs: list[dict[str, Any]]) -> Any:
        return Schema([TensorSpec(np.dtype(s["dtype"]), tuple(d if isinstance(d, int) else -1 for d in s["shape"]),
                                  s["name"]) for s in specs])

    return ModelSignature(inputs=schema(model["inputs"]), outputs=schema(model["outputs"]))


def log_report(tracking_uri: str, run_id: str, report_md: str) -> None:
    """Log the build report (also when the gate failed: the run then shows why nothing shipped)."""
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.md"
        path.write_text(report_md, encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=BUNDLE_ARTIFACTS)


def _log_onnx_model(client: Any, run_id: str, model_bytes: bytes, model: dict[str, Any]) -> None:
    import mlflow.onnx
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        # Explicit requirements: inferring them starts a subprocess that imports the model (~30 s here).
        mlflow.onnx.save_model(onnx.load_from_string(model_bytes), str(Path(tmp) / MODEL_ARTIFACTS),
                               signature=model_signature(model),
                               pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                               # int8 QDQ kernels are the CPU's (the default lists CUDA first, and warns)
                               onnx_execution_providers=["CPUExecutionProvider"],
                               # one file, the bytes the bundle holds (external data reorders the tensors)
                               save_as_external_data=False)
        client.log_artifacts(run_id, str(Path(tmp) / MODEL_ARTIFACTS), artifact_path=MODEL_ARTIFACTS)


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
    """Log bundle, report and the ONNX model to the run, register a version, move `candidate` to it
    when the gate passed; returns its name, version, source, aliases and model URI."""
    from mlflow.exceptions import MlflowException

    from device_agent.bundle.format import read_bundle

    client = _client(tracking_uri)
    client.log_artifact(run_id, str(bundle), artifact_path=BUNDLE_ARTIFACTS)
    log_report(tracking_uri, run_id, report_md)
    for key in ("fp32", "int8", "drop"):
        if isinstance(gate.get(key), int | float):
            client.log_metric(run_id, f"gate_{gate.get('metric', 'metric')}_{key}", float(gate[key]))
    client.set_tag(run_id, "edgekit.bundle_sha256", model_sha256)
    client.set_tag(run_id, "edgekit.gate_passed", str(bool(gate.get("passed"))).lower())
    written = read_bundle(bundle)  # the model exactly as shipped, and its manifest's input/output spec
    _log_onnx_model(client, run_id, written.model_bytes, written.manifest["model"])
    try:
        client.create_registered_model(model_name, description="int8 models built by edge-kit (ONNX flavor); "
                                                               "the device bundle and report are run artifacts")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"runs:/{run_id}/{MODEL_ARTIFACTS}"
    tags = gate_tags(gate, quantization) | {
        "bundle.model_sha256": model_sha256, "bundle.file": bundle.name,
        "bundle.artifact": f"{BUNDLE_ARTIFACTS}/{bundle.name}", "report.artifact": f"{BUNDLE_ARTIFACTS}/report.md"}
    version = str(client.create_model_version(model_name, source, run_id=run_id, tags=tags).version)
    aliases = []
    if gate.get("passed"):
        client.set_registered_model_alias(model_name, CANDIDATE, version)
        aliases.append(CANDIDATE)
    log.info("registered %s version %s in the MLflow model registry (%s)", model_name, version,
             ", ".join(aliases) or "no alias")
    return {"name": model_name, "version": version, "source": source, "aliases": aliases,
            "model_uri": f"models:/{model_name}/{version}"}


def find_version(client: Any, model_name: str, model_sha256: str) -> Any:
    """The newest registered version of `model_name` built from this exact int8 model, or None."""
    versions = [v for v in client.search_model_versions(f"name = '{model_name}'")
                if v.tags.get("bundle.model_sha256") == model_sha256]
    return max(versions, key=lambda v: int(v.version), default=None)


def promote_bundle(tracking_uri: str, bundle: Bundle) -> dict[str, Any]:
    """`promote` for a bundle whose signature was verified (read with a public key); an unverified one is
    refused (VerificationError, exit 4) whatever it claims, since its name picks the registered model.
    The tracking URI is the caller's, never one named inside the bundle."""
    from device_agent.bundle.format import SIGNATURE
    from edge_kit.errors import VerificationError

    if bundle.signed_by is None:
        raise VerificationError(SIGNATURE, f"{bundle.path.name}: promote needs a bundle whose signature was "
                                           "verified", hint="pass --pubkey with the build's public key")
    return promote(tracking_uri, bundle.name, bundle.model_sha256)


def promote(tracking_uri: str, model_name: str, model_sha256: str) -> dict[str, Any]:
    """Move the `champion` alias to the version built from this model; returns it and the previous one.

    Raises UsageError (exit 2) when no version holds this model or its build did not pass the gate.
    """
    from mlflow.exceptions import MlflowException

    from edge_kit.errors import UsageError

    client = _client(tracking_uri)
    try:
        version = find_version(client, model_name, model_sha256)
    except MlflowException as exc:
        raise UsageError(f"cannot read the MLflow registry at {tracking_uri}: {exc.message}") from exc
    if version is None:
        raise UsageError(f"no version of registered model {model_name!r} at {tracking_uri} holds this bundle's "
                         f"model (sha256 {model_sha256[:12]}...)", hint="build it with registration, or pass "
                         "the --tracking-uri it was built with")
    if version.tags.get("gate.passed") != "true":
        raise UsageError(f"{model_name} version {version.version} did not pass the accuracy gate: not promoted")
    try:
        previous = str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        previous = None
    client.set_registered_model_alias(model_name, CHAMPION, version.version)
    log.info("%s version %s is now %s (was %s)", model_name, version.version, CHAMPION, previous or "none")
    return {"name": model_name, "version": str(version.version), "alias": CHAMPION, "previous": previous,
            "model_uri": f"models:/{model_name}@{CHAMPION}", "source": version.source}
