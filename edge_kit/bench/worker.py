"""Measure one engine in this process: `python -m edge_kit.bench.worker JOB.json`.

The runner starts one worker per engine, so each peak-memory figure is that engine's alone (an ONNX
Runtime worker never imports torch). The worker prints JSON lines on stdout: `{"event": "progress",
"step": ...}` after each measurement group and finally `{"event": "result", ...}`; on failure
`{"event": "error", "message": ...}` and exit status 1.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge_kit.bench.measure import latency_summary, throughput_summary, tile_batch, time_calls

Predict = Callable[[np.ndarray], np.ndarray]


def rss_mb() -> float:
    return _proc_status_kb("VmRSS") / 1024.0


def peak_rss_mb() -> float:
    """High-water resident memory of this process. VmHWM starts afresh at exec, unlike ru_maxrss."""
    kb = _proc_status_kb("VmHWM")
    if kb <= 0:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


def _proc_status_kb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def progress_steps(settings: dict[str, Any]) -> int:
    """How many progress events one worker sends: load, then per thread count latency + each batch, accuracy."""
    return 1 + len(settings["thread_counts"]) * (1 + len(settings["batch_sizes"])) + 1


class OnnxEngine:
    def __init__(self, path: str) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._path = path
        self.version = ort.__version__
        self.session = self._session(1)
        self.input_name = self.session.get_inputs()[0].name

    def _session(self, threads: int) -> Any:
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return self._ort.InferenceSession(self._path, opts, providers=["CPUExecutionProvider"])

    def set_threads(self, threads: int) -> None:
        # ONNX Runtime fixes its thread pool when the session is made, so each count gets a session.
        self.session = self._session(threads)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: x})[0])


class TorchEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        self._torch = torch
        self.version = torch.__version__
        self.model = _load_torch_model(spec)
        self.model.eval()

    def set_threads(self, threads: int) -> None:
        self._torch.set_num_threads(threads)

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return np.asarray(self.model(self._torch.from_numpy(x)).numpy())


def _load_torch_model(spec: dict[str, Any]) -> Any:
    for path in spec.get("import_paths", []):
        if path not in sys.path:
            sys.path.insert(0, path)
    if spec.get("config"):
        # The training pipeline's own loader: builds the model exactly as it was trained.
        from edge_kit.config import load_config
        from edge_kit.train.models import load_trained_model

        return load_trained_model(load_config(spec["config"]), Path(spec["checkpoint"]))
    import torch

    module_name, _, func_name = str(spec["factory"]).partition(":")
    model = getattr(importlib.import_module(module_name), func_name)(**spec.get("kwargs", {}))
    state = torch.load(spec["checkpoint"], map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("model", "model_state", "model_state_dict", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    model.load_state_dict(state)
    return model


def measure(job: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    settings = job["settings"]
    data = np.load(job["data"])
    x = np.ascontiguousarray(data[job.get("inputs", "x")])
    y = data["y"] if "y" in data.files else None
    rss_before = rss_mb()

    t0 = time.perf_counter()
    engine: OnnxEngine | TorchEngine = OnnxEngine(job["onnx"]) if job.get("onnx") else TorchEngine(job["torch"])
    engine.predict(tile_batch(x, 1))  # the first call pays for lazy initialisation: part of loading
    load_seconds = time.perf_counter() - t0
    emit({"event": "progress", "step": "load"})

    latency: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    for threads in settings["thread_counts"]:
        engine.set_threads(threads)
        one = tile_batch(x, 1)
        samples = time_calls(partial(engine.predict, one), repeat=settings["latency_repeats"],
                             warmup=settings["warmup"])
        latency.append({"threads": threads, "batch": 1, **latency_summary(samples)})
        emit({"event": "progress", "step": f"latency threads={threads}"})
        for batch in settings["batch_sizes"]:
            xb = tile_batch(x, batch)
            samples = time_calls(partial(engine.predict, xb), repeat=settings["throughput_repeats"],
                                 warmup=max(1, settings["warmup"] // 4))
            throughput.append({"threads": threads, "batch": batch, **throughput_summary(batch, samples)})
            emit({"event": "progress", "step": f"throughput batch={batch} threads={threads}"})

    engine.set_threads(max(settings["thread_counts"]))
    step = int(settings["accuracy_batch"])
    chunks = [x[i : i + step] for i in range(0, len(x), step)]
    predictions = np.concatenate([engine.predict(c).reshape(len(c), -1).argmax(axis=1) for c in chunks])
    accuracy = float(np.mean(predictions == y)) if y is not None else None
    emit({"event": "progress", "step": "accuracy"})
    return {
        "runtime": "onnxruntime" if job.get("onnx") else "torch",
        "runtime_version": engine.version,
        "load_seconds": load_seconds,
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "latency_ms": latency,
        "throughput": throughput,
        "accuracy": accuracy,
        "n_test": len(x),
        "pid": os.getpid(),
    }


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    try:
        result = measure(job, emit)
    except Exception as exc:  # reported to the parent, which names the engine
        emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"event": "result", "figures": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
