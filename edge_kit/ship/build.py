"""`edge-kit build`: train-or-reuse -> calibrate -> quantize -> gate (with fallback) -> reference -> bundle.

Rule zero: the fp32 model always comes from `edge_kit.train.run.train` (reused only when config, code
commit and data hash are unchanged), so there is no way to bundle a model the pipeline did not
train. Nothing is written to the output folder unless the gate passes (the bundle is written
atomically by `write_bundle`); when it fails, only the report lands there, next to where the
bundle would have been.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from calibration import select_calibration
from device_agent.atomic import atomic_write_bytes
from device_agent.bundle.format import bundle_filename, sha256_hex
from edge_kit.compile.coverage import model_int8_coverage
from edge_kit.compile.evaluate import accuracy, predict_logits
from edge_kit.compile.gate import GateFailedError, GateResult, run_gate
from edge_kit.compile.preprocess_graph import embed_preprocessing
from edge_kit.compile.qdq_analysis import summarize_qdq
from edge_kit.compile.quantize import make_quantizer
from edge_kit.compile.search import Decision, search_candidates
from edge_kit.config import Config
from edge_kit.ship.package import assemble_and_write, io_spec, monitor_plan, reference_json, selftest_npz
from edge_kit.ship.report import ReportInputs, render_report

if TYPE_CHECKING:
    from edge_kit.train.data import Dataset

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    bundle: Path
    run_id: str
    gate: GateResult
    model_sha256: str
    registered: dict[str, Any] | None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "run_id": self.run_id,
            "gate": self.gate.to_manifest(),
            "model_sha256": self.model_sha256,
            "registered_model": self.registered,
            "timings": self.timings,
        }


def reference_rows(dataset: Dataset, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) raw rows the reference histograms describe: `base` leaves the field rows out.

    Field rows are appended after the source's in both splits. A reference over base + field describes a
    mixture no device sees: a clean device differs from it, so the retrained version's canary fails on input
    drift (docs/captures.md).
    """
    if which == "all" or dataset.field is None:
        return dataset.X_train, dataset.X_test
    train_end = len(dataset.X_train) - dataset.field.train_rows
    test_end = len(dataset.X_test) - dataset.field.test_rows
    return dataset.X_train[:train_end], dataset.X_test[:test_end]


def failure_report_path(out_dir: Path, config: Config) -> Path:
    return out_dir / f"{config.project.name}-{config.project.version}.report.md"


def build(
    config: Config,
    out_dir: str | Path,
    *,
    signing_key: Ed25519PrivateKey | None,
    backend: str | None = None,
    tracking_uri: str | None = None,
    register: bool = True,
    workdir: Path | None = None,
    reuse: bool = True,
    resume: str = "auto",
    replay: dict[str, Any] | None = None,
) -> BuildResult:
    """Build a signed (or, if signing_key is None, unsigned) bundle; GateFailedError (exit 3) if no candidate passes.

    `replay` (a bundle's `quantization.search`) rebuilds the candidate that bundle shipped instead of timing
    the candidates again: what `reproduce` needs, since timings vary run to run.
    """
    from edge_kit.train.data import load_dataset
    from edge_kit.train.provenance import collect_provenance
    from edge_kit.train.run import train

    out = Path(out_dir)
    backend = backend or config.quantize.backend
    timings: dict[str, float] = {}
    started = time.perf_counter()

    trained = train(config, resume=resume, tracking_uri=tracking_uri, reuse=reuse)
    timings["train" if not trained.reused else "train (reused)"] = time.perf_counter() - started
    dataset = load_dataset(config)
    provenance = collect_provenance(config, dataset)
    selection = select_calibration(list(dataset.train_ids), config.quantize.calibration_samples, config.data.seed)
    provenance["calibration"] = selection.to_manifest(config.quantize.calibration)
    provenance["mlflow"] = {"tracking_uri": trained.tracking_uri, "experiment_id": trained.experiment_id,
                            "run_id": trained.run_id}

    with tempfile.TemporaryDirectory(prefix="edgekit-build-", dir=workdir) as tmp:
        t0 = time.perf_counter()
        quantizer = make_quantizer(backend, config, dataset, trained, selection, Path(tmp))
        timings["calibrate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        x_test = dataset.preprocess(dataset.X_test)
        fp32 = accuracy(predict_logits(quantizer.fp32_path, x_test), dataset.y_test)
        control = quantizer.node_control
        gate = run_gate(
            gate=config.gate, fp32_metric=fp32, quantize=quantizer.quantize,
            evaluate=lambda path: accuracy(predict_logits(path, x_test), dataset.y_test),
            units=quantizer.units,
            tensor_units=control.tensor_units if control is not None else None,
            prefilter=control.prefilter if control is not None else None,
        )
        timings["quantize + gate"] = time.perf_counter() - t0

        quantization = quantizer.describe() | {"excluded_nodes": list(gate.best.excluded_nodes),
                                               "float_tensors": list(gate.best.float_tensors)}
        decision: Decision | None = None
        if gate.passed:
            t0 = time.perf_counter()
            decision = search_candidates(quantizer, gate, config.quantize, config.gate, x_test, dataset.y_test,
                                         replay)
            if decision is not None:
                timings["candidate search"] = time.perf_counter() - t0
        shipped = decision.chosen if decision is not None else None
        if shipped is not None and shipped.path != gate.best.path:
            gate.shipped = (shipped.spec.name, shipped.metric)
        best = shipped.path if shipped is not None else gate.best.path
        excluded = shipped.spec.excluded_nodes if shipped is not None else gate.best.excluded_nodes
        precision = shipped.spec.precision if shipped is not None else "int8"
        notes = list(quantizer.notes)
        if decision is not None and shipped is not None:
            quantization["excluded_nodes"] = list(excluded)
            quantization["float_tensors"] = list(shipped.spec.float_tensors)
            quantization["per_channel"] = shipped.spec.per_channel
            quantization["search"] = decision.to_manifest(quantization.get("host", {}))
            if (note := decision.fp32_faster_note()) is not None:
                notes.append(note)
        qdq = summarize_qdq(best, excluded, tuple(quantization.get("float_tensors", ())))
        quantization["qdq"] = qdq.to_json()
        coverage = model_int8_coverage(best) if precision == "int8" else 0.0
        quantization["int8_coverage"] = round(coverage, 4)
        # An int8 bundle that runs (nearly) everything in fp32 is not what was asked for: refuse it.
        # fp32 shipped on purpose (quantize.allow_fp32) says so in model.precision instead.
        too_little_int8 = gate.passed and precision == "int8" and coverage < config.gate.min_int8_coverage
        sizes = {"fp32 model": Path(trained.onnx).stat().st_size, f"shipped model ({precision})": best.stat().st_size}
        report = ReportInputs(
            config.project.name, config.project.version, gate, quantization,
            provenance["calibration"], qdq, provenance, sizes, timings, notes=notes, search=decision,
        )

        if not gate.passed or too_little_int8:
            report_path = failure_report_path(out, config)
            if too_little_int8:
                report.notes.append(f"int8 coverage {100 * coverage:.1f}% of multiply-accumulates is under "
                                    f"gate.min_int8_coverage {100 * config.gate.min_int8_coverage:.0f}%: no bundle")
            report_md = render_report(report)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(report_path, report_md.encode("utf-8"))
            _log_failure(register, trained.tracking_uri, trained.run_id, report_md)
            if too_little_int8:
                raise GateFailedError(
                    f"int8 coverage gate failed: the model that passed the accuracy gate runs {100 * coverage:.1f}% "
                    f"of its multiply-accumulates in int8, under gate.min_int8_coverage "
                    f"{100 * config.gate.min_int8_coverage:.0f}% (fp32 nodes: {len(excluded)}); no bundle "
                    f"written, report: {report_path}", gate, report_path)
            raise GateFailedError(
                f"accuracy gate failed: best int8 {gate.metric} {gate.best.metric:.4f} vs fp32 {gate.fp32:.4f} "
                f"(drop {gate.fp32 - gate.best.metric:.4f} > allowed {config.gate.max_drop}) after "
                f"{len(gate.rounds) - 1} fallback round(s); no bundle written, report: {report_path}",
                gate, report_path,
            )

        t0 = time.perf_counter()
        # Preprocessing becomes the model's first nodes: the device runs raw inputs through the session.
        shipped_path = Path(tmp) / "shipped.onnx"
        model_bytes = embed_preprocessing(onnx.load(str(best)), dataset.preprocessing).SerializeToString()
        shipped_path.write_bytes(model_bytes)
        plan = monitor_plan(dataset.input_kind, tuple(dataset.input_shape), list(dataset.feature_names),
                            list(dataset.labels))
        x_train, x_test = reference_rows(dataset, config.monitor.reference)
        train_logits = predict_logits(shipped_path, x_train)
        test_logits = predict_logits(shipped_path, x_test)
        reference = reference_json(plan, x_train, train_logits, x_test, test_logits, config.monitor.bins)
        timings["reference"] = time.perf_counter() - t0
        report.bundle = bundle_filename(config.project.name, config.project.version)
        report_md = render_report(report)
        model_meta = io_spec(onnx.load_from_string(model_bytes)) | {
            "preprocessing": dataset.preprocessing | {"in_graph": True}}
        bundle = assemble_and_write(
            out, name=config.project.name, version=config.project.version, model_bytes=model_bytes,
            model_meta=model_meta, labels=list(dataset.labels), provenance=provenance,
            quantization=quantization, gate=gate.to_manifest(), plan=plan, reference=reference,
            report_md=report_md, selftest=selftest_npz(dataset.X_test, test_logits), signing_key=signing_key,
            precision=precision,
        )

    registered = None
    if register:
        from edge_kit.ship.registry import log_and_register

        registered = log_and_register(
            trained.tracking_uri, trained.run_id, config.project.name, bundle, report_md,
            gate.to_manifest(), quantization, sha256_hex(model_bytes),
        )
    timings["total"] = time.perf_counter() - started
    log.info("wrote %s (gate %s: %s %.4f -> %.4f)", bundle, "passed", gate.metric, gate.fp32, gate.best.metric)
    return BuildResult(bundle, trained.run_id, gate, sha256_hex(model_bytes), registered, timings)


def _log_failure(register: bool, tracking_uri: str, run_id: str, report_md: str) -> None:
    if not register:
        return
    from edge_kit.ship.registry import log_report

    try:
        log_report(tracking_uri, run_id, report_md)
    except Exception as exc:  # the gate failure is the error to report, not a tracking hiccup
        log.warning("could not log the failure report to MLflow run %s: %s", run_id, exc)
