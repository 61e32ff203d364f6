"""The model of a verified bundle as an ONNX Runtime session: preprocessing, input checks, inference.

Bundles built with `model.preprocessing.in_graph = true` standardise inside the model (its first
nodes), so raw float32 goes straight to the session. Older bundles' models take PREPROCESSED input,
`(raw - mean) / std` with mean/std from the manifest, which the agent applies here with exactly the
arithmetic the build used.
Requests are checked before they reach the session (shape, dtype, NaN/inf) and refused with an
`InputError` that says what was expected; the session itself is never handed garbage.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from device_agent.bundle.format import SELFTEST, Bundle
from device_agent.errors import InputError, VerificationError
from device_agent.monitoring.channels import MonitorPlan

__all__ = ["SELFTEST_ATOL", "SELFTEST_RTOL", "ModelInfo", "ModelRuntime", "session_options"]

_FLOAT32 = np.dtype(np.float32)  # native-order float32 is one shared dtype object: an identity check
_isfinite = np.isfinite
_NOT_FINITE = b"\x00"  # a False in a bool mask's bytes
_BYTE_SCAN_MAX = 1 << 16  # values per request checked by a byte scan of the mask (64 KiB mask at most)

# Self-test tolerance: int8 kernels differ slightly between instruction sets (VNNI, AVX2, Arm dot
# product), so the recorded logits are matched within a fraction of their range, and every
# predicted class must match exactly.
SELFTEST_RTOL = 1e-2
SELFTEST_ATOL = 1e-3


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Options for a small device: full graph optimisation, one sequential executor, one thread.

    One intra-op thread by default (`threads` in the config changes it; 0 = ONNX Runtime's default,
    all cores, as `threads = 0` means in every edge-kit config): device models are small,
    and the device runs other work. A thread pool makes every operator wait at a barrier for its
    slowest worker, so one descheduled worker stalls the whole inference: on the 2-core test VM
    under load the digits model ran 2-3x faster with one thread than with two (benchmarks/
    bench_agent.py). Spinning is off for the same reason: an idle spin burns a core the
    application needs.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def _broadcast_stat(value: Any, sample_shape: tuple[int, ...], key: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    try:
        np.broadcast_shapes(arr.shape, sample_shape)
    except ValueError as exc:
        raise VerificationError(
            "manifest.json", f"model.preprocessing.{key} has shape {arr.shape}, not broadcastable to {sample_shape}"
        ) from exc
    return arr


class ModelRuntime:
    """One bundle's model, ready to run. Thread-safe: ORT sessions may be run from several threads."""

    def __init__(self, bundle: Bundle, *, intra_op_threads: int = 1) -> None:
        manifest = bundle.manifest
        model = manifest.get("model", {})
        self.info = ModelInfo(bundle.name, bundle.version, bundle.model_sha256)
        try:
            self.plan = MonitorPlan.from_manifest(manifest["monitoring"])
        except (KeyError, ValueError) as exc:
            raise VerificationError("manifest.json", f"monitoring entry missing or malformed: {exc}") from exc
        self.sample_shape = self.plan.input_shape
        self.labels = list(manifest.get("labels") or self.plan.labels)
        try:
            self.session = ort.InferenceSession(
                bundle.model_bytes, sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            raise VerificationError("model.onnx", f"ONNX Runtime cannot load the model: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise VerificationError("model.onnx", f"expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._first_output = self.output_names[:1]
        self._session_run = _unchecked_run(self.session)
        pre = model.get("preprocessing") or {}
        self.mean = _broadcast_stat(pre.get("mean", 0.0), self.sample_shape, "mean")
        self.std = _broadcast_stat(pre.get("std", 1.0), self.sample_shape, "std")
        if np.any(self.std == 0):
            raise VerificationError("manifest.json", "model.preprocessing.std contains zeros")
        self.in_graph = pre.get("in_graph") is True
        self._sample_size = int(np.prod(self.sample_shape))
        self.selftest = _read_selftest(bundle)

    @property
    def n_classes(self) -> int:
        return len(self.plan.labels)

    def as_batch(self, raw: Any) -> np.ndarray:
        """A request as a float32 (n, *sample_shape) batch; raises InputError for anything else.

        Accepted: one sample in the model's input shape, a batch of them, or flat rows of the same
        size (CSV rows). Integer inputs are converted; anything non-numeric is refused.
        """
        x = raw
        if (type(x) is np.ndarray and x.dtype is _FLOAT32 and x.shape[1:] == self.sample_shape
                and x.flags.c_contiguous and len(x)):
            return self._finite(x)  # the common case, already a proper batch: only the value check
        x = np.asarray(raw)
        if x.dtype.kind not in "fiub":
            raise InputError(f"inputs must be numeric, got dtype {x.dtype}")
        if x.dtype.kind == "b":
            raise InputError("inputs must be numeric, got booleans")
        shape = self.sample_shape
        if x.shape == shape:
            x = x.reshape((1, *shape))
        elif x.ndim == len(shape) + 1 and x.shape[1:] == shape:
            pass
        elif x.ndim == 2 and x.shape[1] == self._sample_size:
            x = x.reshape((len(x), *shape))
        elif x.ndim == 1 and x.size == self._sample_size:
            x = x.reshape((1, *shape))
        else:
            raise InputError(
                f"input shape {tuple(x.shape)} does not fit the model: expected {shape} for one sample, "
                f"(n, {', '.join(map(str, shape))}) for a batch, or (n, {self._sample_size}) flat rows"
            )
        if len(x) == 0:
            raise InputError("the batch is empty")
        return self._finite(np.ascontiguousarray(x, dtype=np.float32))

    @staticmethod
    def _finite(x: np.ndarray) -> np.ndarray:
        if x.size <= _BYTE_SCAN_MAX:
            # A small request: the isfinite mask searched for a False byte (memchr), with no numpy
            # reduction. Measured on the digits model at batch 1, a numpy reduction just before the
            # session run slowed the run itself by several times the reduction's own cost, while an
            # elementwise ufunc did not.
            finite = _NOT_FINITE not in _isfinite(x).tobytes()
        else:
            # A large one: one float64 sum instead of a mask. NaN and inf propagate into it, and
            # float32 values cannot overflow a float64 sum, so it is finite exactly when every value is.
            finite = math.isfinite(x.sum(dtype=np.float64))
        if not finite:
            raise InputError("inputs contain NaN or infinite values")
        return x

    def preprocess(self, batch: np.ndarray) -> np.ndarray:
        """`(raw - mean) / std` in float32, the build's arithmetic (one temporary, divided in place)."""
        if self.in_graph:  # the model's own first nodes do it
            return batch
        x: np.ndarray = np.subtract(batch, self.mean, dtype=np.float32)
        x /= self.std
        return x

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for an already checked raw batch (see `as_batch`)."""
        return np.asarray(self._session_run(self._first_output, {self.input_name: self.preprocess(batch)}, None)[0])

    def self_test(self) -> dict[str, Any]:
        """Run the bundle's recorded inputs and compare with the recorded outputs; raises if they differ."""
        if self.selftest is None:
            return {"ran": False, "reason": f"bundle has no {SELFTEST}"}
        inputs, expected = self.selftest
        try:
            got = self.run(self.as_batch(inputs))
        except InputError as exc:
            raise VerificationError(SELFTEST, f"recorded inputs do not fit the model: {exc}") from exc
        expected = expected.reshape(got.shape) if expected.size == got.size else expected
        if got.shape != expected.shape:
            raise VerificationError(SELFTEST, f"model gave outputs of shape {got.shape}, recorded {expected.shape}")
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
        max_diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        same_class = bool(np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)))
        if not same_class or max_diff > SELFTEST_ATOL + SELFTEST_RTOL * scale:
            raise VerificationError(
                SELFTEST,
                f"model outputs differ from the recorded ones on this device (max abs diff {max_diff:.4g}, "
                f"classes {'match' if same_class else 'differ'})",
            )
        return {"ran": True, "samples": len(inputs), "max_abs_diff": max_diff}


_SessionRun = Callable[[list[str], dict[str, np.ndarray], None], Any]


def _unchecked_run(session: ort.InferenceSession) -> _SessionRun:
    """The session's run without the Python wrapper's per-call checks (feed names present, OrtValue
    ownership, WebGPU graph capture): the agent always feeds exactly the model's one input as a
    numpy array on the CPU provider, so they cannot fail, and at batch 1 they cost a tenth of the
    digits model's inference. Falls back to the public `run` where the binding is not there."""
    inner = getattr(session, "_sess", None)
    run: _SessionRun | None = getattr(inner, "run", None)
    return run if callable(run) else session.run


def _read_selftest(bundle: Bundle) -> tuple[np.ndarray, np.ndarray] | None:
    data = bundle.members.get(SELFTEST)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return np.asarray(npz["inputs"]), np.asarray(npz["outputs"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as exc:
        raise VerificationError(SELFTEST, f"not an npz with 'inputs' and 'outputs': {exc}") from exc
