"""Where the benchmarked models and data come from, for a bundle.

- int8: the bundle's own `model.onnx` (after the bundle is verified).
- fp32 ONNX and the PyTorch checkpoint: given explicitly; else, with `--config`, the local folder of the
  bundle's training run (`.edgekit/runs/<run_id>/`); else the artifacts of that MLflow run (manifest
  provenance.mlflow), downloaded.
- PyTorch model code: the project config (`--config`), through the training pipeline's loader.
- Held-out data: given explicitly, or the config's test split (`edge_kit.data.load_dataset`), which
  was never used for training or calibration. Without either, seeded synthetic inputs of the model's
  input shape: speed and memory are still measured, accuracy is not.

Whatever cannot be found is named in `BenchPlan.missing` with the reason, and the report says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.format import MODEL, read_bundle
from edge_kit.bench.plan import FP32, INT8, PYTORCH, BenchPlan, BenchSettings, EngineSpec, EvalData, TorchModelSpec
from edge_kit.bench.tracking import run_location, unreachable_reason
from edge_kit.errors import EdgeKitError, UsageError
from edge_kit.train.tracking import CHECKPOINT_ARTIFACT, ONNX_ARTIFACT

log = logging.getLogger(__name__)

SYNTHETIC_SAMPLES = 256
# Where the training pipeline logs them in its MLflow run.
PIPELINE_ARTIFACTS = {"onnx": ONNX_ARTIFACT, "checkpoint": CHECKPOINT_ARTIFACT}


def plan_for_bundle(
    bundle_path: str | Path,
    workdir: Path,
    *,
    settings: BenchSettings,
    config_path: str | Path | None = None,
    fp32_onnx: Path | None = None,
    torch_model: TorchModelSpec | None = None,
    test_data: EvalData | None = None,
) -> BenchPlan:
    """A plan for `bundle_path`; explicit sources win over the ones resolved from the config and MLflow."""
    bundle = read_bundle(bundle_path)  # refuses tampered or corrupt bundles (exit 4)
    manifest = bundle.manifest
    missing: dict[str, str] = {}
    notes: list[str] = []
    int8_file = workdir / "int8-model.onnx"
    int8_file.write_bytes(bundle.model_bytes)
    in_graph = ((manifest.get("model") or {}).get("preprocessing") or {}).get("in_graph") is True
    engines = [EngineSpec(INT8, onnx=int8_file, source=f"{bundle.path}:{MODEL}", raw_inputs=in_graph)]

    config = None
    if config_path is not None:
        from edge_kit.config import load_config

        config = load_config(config_path)

    run_files: dict[str, Path] = local_run_files(config, manifest) if config is not None else {}
    if not run_files and (fp32_onnx is None or (torch_model is None and config is not None)):
        run_files, reason = run_artifacts(manifest, workdir / "run")
        if reason:
            notes.append(f"fp32 model and checkpoint not taken from the MLflow run: {reason}")

    fp32 = fp32_onnx or run_files.get("onnx")
    if fp32 is not None:
        engines.append(EngineSpec(FP32, onnx=Path(fp32), source=_describe(Path(fp32), run_files, "onnx", manifest)))
    else:
        missing[FP32] = "no fp32 ONNX model: the bundle's MLflow run is not reachable and none was given"

    if torch_model is None and config is not None and "checkpoint" in run_files:
        torch_model = TorchModelSpec(checkpoint=run_files["checkpoint"], config=config.path)
    if torch_model is not None:
        engines.append(EngineSpec(PYTORCH, torch=torch_model,
                                  source=_describe(torch_model.checkpoint, run_files, "checkpoint", manifest)))
    elif config is None:
        missing[PYTORCH] = "no PyTorch checkpoint: pass --config (the model code) with a reachable MLflow run"
    else:
        missing[PYTORCH] = "no PyTorch checkpoint: the bundle's MLflow run is not reachable or holds no .pt artifact"

    if test_data is None and config is not None:
        test_data, data_note = held_out_split(config, manifest)
        if data_note:
            notes.append(data_note)
    if test_data is None:
        test_data = synthetic_inputs(int8_file, manifest)
    return BenchPlan(bundle.path, manifest, tuple(engines), test_data, settings, missing, tuple(notes))


def _describe(path: Path, run_files: dict[str, Path], kind: str, manifest: dict[str, Any]) -> str:
    if run_files.get(kind) == path and f"{kind}_artifact" in run_files:
        _, run_id = run_location(manifest)
        return f"mlflow run {run_id}: {run_files[kind + '_artifact']}"
    return str(path)


def local_run_files(config: Any, manifest: dict[str, Any]) -> dict[str, Path]:
    """The training run's own folder on this machine (`.edgekit/runs/<run_id>/`), when it is here."""
    from edge_kit.train.run_record import FINAL_CHECKPOINT, ONNX_FILE, run_folder

    _, run_id = run_location(manifest)
    if not run_id:
        return {}
    folder = run_folder(config, run_id)
    found = {"onnx": folder / ONNX_FILE, "checkpoint": folder / FINAL_CHECKPOINT}
    return {k: v for k, v in found.items() if v.is_file()}


def run_artifacts(manifest: dict[str, Any], dest: Path) -> tuple[dict[str, Path], str | None]:
    """Download the fp32 ONNX and the final checkpoint logged by the bundle's MLflow run.

    Returns {"onnx": path, "checkpoint": path, "<kind>_artifact": artifact path} (what was found),
    and a reason when the run could not be read.
    """
    tracking_uri, run_id = run_location(manifest)
    if not tracking_uri or not run_id:
        return {}, "the bundle names no MLflow run (provenance.mlflow)"
    reason = unreachable_reason(tracking_uri)
    if reason:
        return {}, reason
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        artifacts = _list_files(client, run_id, "")
        found: dict[str, Path] = {}
        for kind, suffixes in (("onnx", (".onnx",)), ("checkpoint", (".pt", ".pth"))):
            chosen = _pick(artifacts, suffixes, PIPELINE_ARTIFACTS[kind])
            if chosen is not None:
                dest.mkdir(parents=True, exist_ok=True)
                found[kind] = Path(client.download_artifacts(run_id, chosen, str(dest)))
                found[f"{kind}_artifact"] = Path(chosen)
    except Exception as exc:  # a missing run, a dead server: the report says which
        return {}, f"MLflow run {run_id} at {tracking_uri} could not be read: {type(exc).__name__}: {exc}"
    return found, None


def _list_files(client: Any, run_id: str, path: str) -> list[str]:
    files: list[str] = []
    for info in client.list_artifacts(run_id, path or None):
        files.extend(_list_files(client, run_id, info.path) if info.is_dir else [info.path])
    return files


def _pick(artifacts: list[str], suffixes: tuple[str, ...], known: str) -> str | None:
    """The model file among a run's artifacts: the training pipeline's own name, else one named like a final
    model, else the shortest path."""
    if known in artifacts:
        return known
    candidates = [a for a in artifacts if a.endswith(suffixes)]
    if not candidates:
        return None
    preferred = [a for a in candidates if any(w in Path(a).name for w in ("final", "model", "fp32", "last"))]
    return sorted(preferred or candidates, key=lambda a: (len(Path(a).parts), a))[0]


def held_out_split(config: Any, manifest: dict[str, Any]) -> tuple[EvalData, str | None]:
    """The config's held-out test split, preprocessed as the model expects (the training pipeline's code),
    and a warning when its data snapshot is not the one the bundle was built from."""
    from edge_kit.train.data import load_dataset

    dataset = load_dataset(config)
    x = np.asarray(dataset.preprocess(np.asarray(dataset.X_test)), dtype=np.float32)
    raw = np.ascontiguousarray(np.asarray(dataset.X_test, dtype=np.float32))
    y = class_indices(np.asarray(dataset.y_test), manifest)
    data = EvalData(np.ascontiguousarray(x), y, f"held-out split of {config.data.source}, {len(x)} samples",
                    x_raw=raw)
    built_from = ((manifest.get("provenance") or {}).get("data") or {}).get("dvc_md5")
    current = dataset.snapshot.dvc_md5
    if built_from and current and built_from != current:
        return data, (f"the config's data snapshot (DVC md5 {current}) is not the bundle's ({built_from}): "
                      "accuracy is measured on different data than the build used")
    return data, None


def class_indices(y: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """Labels as the class indices the model outputs (names are looked up in the manifest's labels)."""
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    labels = [str(v) for v in (manifest.get("model") or {}).get("labels") or manifest.get("labels") or []]
    index = {name: i for i, name in enumerate(labels)}
    try:
        return np.array([index[str(v)] for v in y], dtype=np.int64)
    except KeyError as exc:
        raise UsageError(f"test label {exc} is not one of the bundle's labels {labels}") from exc


def synthetic_inputs(model_file: Path, manifest: dict[str, Any], n: int = SYNTHETIC_SAMPLES) -> EvalData:
    """Seeded N(0, 1) inputs of the model's input shape (first input); speed does not depend on the values.

    The shape comes from the manifest's `model.inputs`, else from the ONNX graph.
    """
    declared = ((manifest.get("model") or {}).get("inputs") or [{}])[0].get("shape") or []
    dims: list[int | None] = [None, *[int(d) if isinstance(d, int) else None for d in declared[1:]]]
    if not declared or any(d is None for d in dims[1:]):
        dims = _graph_input_dims(model_file)
    sample_shape = [d for d in dims[1:] if d is not None]
    if len(sample_shape) != len(dims) - 1:
        raise UsageError(f"cannot tell the model's input shape ({dims}); pass --config for real test data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *sample_shape)).astype(np.float32)
    return EvalData(x, None, f"{n} synthetic N(0,1) inputs (seed 0): no --config, so no held-out split")


def _graph_input_dims(model_file: Path) -> list[int | None]:
    import onnx

    try:
        graph_input = onnx.load(str(model_file), load_external_data=False).graph.input[0]
    except Exception as exc:  # protobuf decode errors and friends
        raise EdgeKitError(f"the bundle's {MODEL} is not a readable ONNX model: {type(exc).__name__}: {exc}") from exc
    return [d.dim_value if d.dim_value > 0 else None for d in graph_input.type.tensor_type.shape.dim]
