"""MLflow tracking: one MLflow run per training run, resumed across interruptions.

Default store: SQLite (`.edgekit/mlflow.db`) with an artifact folder (`.edgekit/mlartifacts`) beside
the config, so a project carries its own history; `--tracking-uri` or MLFLOW_TRACKING_URI point it at a
tracking server instead. mlflow is imported inside functions: `edge-kit --help` must stay instant.

What a run holds: params = the whole resolved config (dotted keys); tags = the provenance legs
(`edgekit.git_commit`, `edgekit.git_dirty`, `edgekit.lock_sha256`, `edgekit.data_md5`, versions) and
the config fingerprint; per-epoch metrics; artifacts = final checkpoint, fp32 ONNX, resolved config,
provenance and the stored split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from edge_kit.config import Config

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_PREFIX = "edgekit."
TAG_FINGERPRINT = "edgekit.config_fingerprint"
TAG_TRAINING_FINGERPRINT = "edgekit.training_fingerprint"
TAG_COMMIT = "edgekit.git_commit"
TAG_DIRTY = "edgekit.git_dirty"
TAG_DATA_MD5 = "edgekit.data_md5"
TAG_LOCK = "edgekit.lock_sha256"
TAG_COMPLETED = "edgekit.completed"
CHECKPOINT_ARTIFACT = "model/final.pt"
ONNX_ARTIFACT = "model/model.onnx"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(config: Config, override: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the SQLite store inside the project's `.edgekit/`."""
    if override:
        return override
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{config.ensure_workdir() / 'mlflow.db'}"


def is_default_store(config: Config, uri: str) -> bool:
    return uri == f"sqlite:///{config.workdir / 'mlflow.db'}"


def client_for(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, config: Config, uri: str) -> str:
    """The experiment named after the project, created with the local artifact folder for the default store."""
    name = config.project.name
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifact_location(config, uri)))


def artifact_location(config: Config, uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database (MLflow's default is ./mlruns in the cwd);
    a tracking server decides for itself."""
    if is_default_store(config, uri):
        return (config.workdir / "mlartifacts").resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def flatten_params(config: Config) -> dict[str, str]:
    """The whole resolved config as dotted MLflow params (tables and lists as JSON)."""
    params: dict[str, str] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list | tuple) else str(value)
            params[f"{section}.{key}"] = text[:MAX_PARAM_CHARS]
    return params


def provenance_tags(provenance: dict[str, Any]) -> dict[str, str]:
    env = provenance["environment"]
    tags = {
        TAG_COMMIT: str(provenance["git"]["commit"]),
        TAG_DIRTY: str(provenance["git"]["dirty"]).lower(),
        TAG_LOCK: str(env["lock_sha256"]),
        TAG_DATA_MD5: str(provenance["data"]["dvc_md5"]),
        "edgekit.data_path": str(provenance["data"]["path"]),
        "edgekit.installed_sha256": str(env["installed_sha256"]),
        "edgekit.python": str(env["python"]),
        "edgekit.platform": str(env["platform"]),
        "edgekit.cuda": json.dumps(env["cuda"]),
        "edgekit.container_image": json.dumps(env["container_image"]),
    }
    for package, version in env["packages"].items():
        tags[f"edgekit.version.{package}"] = version
    if provenance["git"]["commit"]:
        tags["mlflow.source.git.commit"] = str(provenance["git"]["commit"])
    return tags


@dataclass(frozen=True)
class RunHandle:
    client: MlflowClient
    run_id: str
    experiment_id: str
    tracking_uri: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def start_run(client: MlflowClient, experiment_id: str, uri: str, config: Config, tags: dict[str, str]) -> RunHandle:
    from mlflow.entities import Param, RunTag

    run = client.create_run(experiment_id, tags=tags, run_name=f"{config.project.name}-{config.project.version}")
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten_params(config).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    client.log_batch(run_id, tags=[RunTag("mlflow.note.content", f"edge-kit training of {config.path.name}")])
    return RunHandle(client, run_id, experiment_id, uri)


def resume_run(client: MlflowClient, run_id: str, uri: str) -> RunHandle | None:
    """Reopen the MLflow run an interrupted training started; None if the store no longer has it."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    client.update_run(run_id, status="RUNNING")
    return RunHandle(client, run_id, run.info.experiment_id, uri)


def artifact_local_path(client: MlflowClient, uri: str, run_id: str, artifact: str, download_to: Path) -> Path | None:
    """A local file for a run's artifact: the file itself for a local store, else a download; None if absent."""
    run = client.get_run(run_id)
    root = run.info.artifact_uri
    parsed = urlparse(root)
    if parsed.scheme in ("", "file"):
        local = Path(unquote(parsed.path)) / artifact
        return local if local.is_file() else None
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(download_to),
                                       tracking_uri=uri))
    except (MlflowException, OSError):
        return None


def find_reusable_runs(client: MlflowClient, experiment_id: str, *, fingerprint: str, commit: str,
                       data_md5: str) -> list[Any]:
    """FINISHED runs of this training fingerprint, clean commit and data snapshot, newest first."""
    query = (f"tags.`{TAG_TRAINING_FINGERPRINT}` = '{fingerprint}' and tags.`{TAG_COMMIT}` = '{commit}' "
             f"and tags.`{TAG_DIRTY}` = 'false' and tags.`{TAG_DATA_MD5}` = '{data_md5}' "
             f"and tags.`{TAG_COMPLETED}` = 'true' and attributes.status = 'FINISHED'")
    return list(client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                   max_results=20))
