"""The model of a verified bundle as an ONNX Runtime session: preprocessing, input checks, inference.

Bundles built with `model.preprocessing.in_graph = true` standardise inside the model (its first
nodes), so raw float32 goes straight to the session. Older bundles' models take PREPROCESSED input,
`(raw - mean) / std` with mean/std from the manifest: the agent folds exactly that arithmetic into
the graph at load (`fold_preprocessing`, outputs bit-identical), or applies it in numpy where the
graph is not one it can edit (`ModelRuntime.folded` says which).
Requests are checked before they reach the session (shape, dtype, NaN/inf) and refused with an
`InputError` that says what was expected; the session itself is never handed garbage.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from device_agent.bundle.format import SELFTEST, Bundle
from device_agent.errors import InputError, VerificationError
from device_agent.monitoring.channels import MonitorPlan

__all__ = ["SELFTEST_ATOL", "SELFTEST_RTOL", "ModelInfo", "ModelRuntime", "fold_preprocessing", "session_options"]

log = logging.getLogger(__name__)

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
        pre = model.get("preprocessing") or {}
        self.mean = _broadcast_stat(pre.get("mean", 0.0), self.sample_shape, "mean")
        self.std = _broadcast_stat(pre.get("std", 1.0), self.sample_shape, "std")
        if np.any(self.std == 0):
            raise VerificationError("manifest.json", "model.preprocessing.std contains zeros")
        self.in_graph = pre.get("in_graph") is True
        # An older bundle preprocesses outside its model: the agent folds `(raw - mean) / std` into the
        # graph here as its first nodes (what `edge-kit build` now ships), so raw inputs go straight to
        # the session. `folded` says it did; where the graph is not one it can edit, numpy does it.
        model_bytes = bundle.model_bytes
        self.folded = False
        if not self.in_graph:
            folded = fold_preprocessing(model_bytes, self.mean, self.std)
            if folded is not None:
                model_bytes, self.folded = folded, True
        try:
            self.session = ort.InferenceSession(
                model_bytes, sess_options=session_options(intra_op_threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for a bad graph
            if not self.folded:
                raise VerificationError("model.onnx", f"ONNX Runtime cannot load the model: {exc}") from exc
            log.warning("the model with its preprocessing folded in did not load (%s); preprocessing in numpy", exc)
            self.folded = False
            try:
                self.session = ort.InferenceSession(bundle.model_bytes, sess_options=session_options(intra_op_threads),
                                                    providers=["CPUExecutionProvider"])
            except Exception as exc2:
                raise VerificationError("model.onnx", f"ONNX Runtime cannot load the model: {exc2}") from exc2
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise VerificationError("model.onnx", f"expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._first_output = self.output_names[:1]
        self._session_run = _unchecked_run(self.session)
        self._raw_in = self.in_graph or self.folded  # the session takes raw inputs
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
        if not self._raw_in:
            batch = self.preprocess(batch)
        return np.asarray(self._session_run(self._first_output, {self.input_name: batch}, None)[0])

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


# -- folding the preprocessing into an ONNX graph, at the protobuf wire level ---------------------------
# The agent has ONNX Runtime but not the `onnx` package: the few ModelProto fields this needs are
# edited directly in the serialised bytes (every other field is copied through byte for byte). It
# does what `edge_kit.compile.preprocess_graph.embed_preprocessing` does at build time: the graph
# input keeps its name and type, two nodes `Sub(raw, mean) -> Div(., std)` come first, and every
# node that read the input reads their result. Sub and Div are exact IEEE float32 operations in ONNX
# Runtime as in numpy, so the outputs are those of numpy preprocessing, bit for bit.
_GRAPH = 7  # ModelProto.graph
_G_NODE, _G_INITIALIZER, _G_INPUT, _G_OUTPUT = 1, 5, 11, 12  # GraphProto fields
_N_INPUT, _N_OUTPUT, _N_NAME, _N_OP, _N_ATTRIBUTE = 1, 2, 3, 4, 5  # NodeProto fields
_A_GRAPH, _A_GRAPHS = 6, 11  # AttributeProto: a subgraph (it could read the input by outer scope)
_FLOAT_ELEM = 1  # TensorProto.FLOAT


class _WireError(ValueError):
    pass


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any, bytes]]:
    """(field number, wire type, value, the field's raw bytes) for each field of one message."""
    out: list[tuple[int, int, Any, bytes]] = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise _WireError(f"wire type {wire}")
        if pos > len(buf):
            raise _WireError("truncated field")
        out.append((number, wire, value, buf[start:pos]))
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _str_field(number: int, text: str) -> bytes:
    return _bytes_field(number, text.encode())


def _string(value: Any) -> str:
    return bytes(value).decode()


def _tensor(name: str, array: np.ndarray) -> bytes:
    """A float32 TensorProto: dims, data_type, name, raw_data (little-endian)."""
    dims = b"".join(_varint(1 << 3) + _varint(int(d)) for d in array.shape)
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return dims + _varint(2 << 3) + _varint(_FLOAT_ELEM) + _str_field(8, name) + _bytes_field(9, raw)


def _node(op: str, inputs: list[str], output: str, name: str) -> bytes:
    return (b"".join(_str_field(_N_INPUT, i) for i in inputs) + _str_field(_N_OUTPUT, output)
            + _str_field(_N_NAME, name) + _str_field(_N_OP, op))


def _elem_type(value_info: bytes) -> int | None:
    """ValueInfoProto.type.tensor_type.elem_type, or None where it is not a tensor."""
    for number, wire, value, _ in _fields(value_info):
        if number == 2 and wire == 2:  # type
            for n2, w2, v2, _ in _fields(value):
                if n2 == 1 and w2 == 2:  # tensor_type
                    for n3, w3, v3, _ in _fields(v2):
                        if n3 == 1 and w3 == 0:
                            return int(v3)
    return None


def _value_name(message: bytes) -> str | None:
    for number, wire, value, _ in _fields(message):
        if number == 1 and wire == 2:
            return _string(value)
    return None


def fold_preprocessing(model_bytes: bytes, mean: np.ndarray, std: np.ndarray) -> bytes | None:
    """The model with `(raw - mean) / std` as its first nodes, or None where it cannot be done safely:
    not one float32 graph input, the input also a graph output, a subgraph in the model (it could read
    the input by outer scope), or bytes that are not a ModelProto."""
    try:
        model = _fields(model_bytes)
        graphs = [f for f in model if f[0] == _GRAPH and f[1] == 2]
        if len(graphs) != 1:
            return None
        graph = _fields(graphs[0][2])
        initializers = {_value_name(v) for n, w, v, _ in graph if n == _G_INITIALIZER and w == 2}
        inputs = [v for n, w, v, _ in graph if n == _G_INPUT and w == 2 and _value_name(v) not in initializers]
        if len(inputs) != 1 or _elem_type(inputs[0]) != _FLOAT_ELEM:
            return None
        raw = _value_name(inputs[0])
        if raw is None or any(_value_name(v) == raw for n, w, v, _ in graph if n == _G_OUTPUT and w == 2):
            return None
        names = {raw} | {x for x in initializers if x}
        for n, w, v, _ in graph:
            if n == _G_NODE and w == 2:
                for n2, w2, v2, _ in _fields(v):
                    if n2 in (_N_INPUT, _N_OUTPUT) and w2 == 2:
                        names.add(_string(v2))
                    elif n2 == _N_ATTRIBUTE and any(a[0] in (_A_GRAPH, _A_GRAPHS) for a in _fields(v2)):
                        return None
        prefix = f"{raw}_agent_preprocessing"
        while any(name.startswith(prefix) for name in names):
            prefix += "_"
        mean_name, std_name, centred, standardised = (f"{prefix}_{s}" for s in ("mean", "std", "centred", "out"))
        body = [_bytes_field(_G_NODE, _node("Sub", [raw, mean_name], centred, f"{prefix}_sub")),
                _bytes_field(_G_NODE, _node("Div", [centred, std_name], standardised, f"{prefix}_div"))]
        for n, w, v, field in graph:
            if n == _G_NODE and w == 2:
                node = [(_str_field(_N_INPUT, standardised) if n2 == _N_INPUT and w2 == 2 and _string(v2) == raw
                         else f2) for n2, w2, v2, f2 in _fields(v)]
                body.append(_bytes_field(_G_NODE, b"".join(node)))
            else:
                body.append(field)
        body += [_bytes_field(_G_INITIALIZER, _tensor(mean_name, mean)),
                 _bytes_field(_G_INITIALIZER, _tensor(std_name, std))]
        new_graph = b"".join(body)
        return b"".join(_bytes_field(_GRAPH, new_graph) if n == _GRAPH else field for n, _, _, field in model)
    except (_WireError, UnicodeDecodeError):
        return None


def _read_selftest(bundle: Bundle) -> tuple[np.ndarray, np.ndarray] | None:
    data = bundle.members.get(SELFTEST)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return np.asarray(npz["inputs"]), np.asarray(npz["outputs"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as exc:
        raise VerificationError(SELFTEST, f"not an npz with 'inputs' and 'outputs': {exc}") from exc
