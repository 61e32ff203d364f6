"""Run an ONNX model with ONNX Runtime over a whole split, in batches: the one evaluator the gate uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(model_path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def predict_logits(model_path: str | Path, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's first output for every row of `inputs` (already preprocessed), as float32."""
    sess = session(model_path)
    name = sess.get_inputs()[0].name
    outs = [
        sess.run(None, {name: np.ascontiguousarray(inputs[i : i + batch_size], dtype=np.float32)})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outs, axis=0).astype(np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
