"""`edge-agent predict`: run a bundle over a file of inputs, streaming, so memory stays flat.

Inputs are read a batch at a time with plain reads and outputs appended to the .npy as they are
computed, so a file larger than RAM goes through with memory bounded by one batch (no memory
mapping either: mapped pages count as resident and would make the process look as big as the file):
- `.npy`: the header is parsed, then rows are read batch by batch;
- `.npz`: the same, from the zip member of the array `inputs` (or `X`, or the only one);
- `.csv`: rows of numbers (a non-numeric first row is taken as a header), read line by line.
The shape a file declares is checked before anything is allocated for it: a row must hold what the
model takes (`row_values`) and at most MAX_ROW_BYTES, so a small crafted file that declares one huge
row is refused (exit 2) instead of being inflated into memory.
The output holds the model outputs (logits), one row per input row, float32; it is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import csv
import math
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from device_agent.errors import DataError, InputError, UsageError
from device_agent.runtime import ModelRuntime

NPZ_KEYS = ("inputs", "X", "x")
MAX_ROW_BYTES = 64 * 1024 * 1024  # one input row, whatever the model; a batch reads at most
MAX_BATCH_BYTES = 64 * 1024 * 1024  # this much (or one row) at once, whatever --batch-size says


def _npz_member(zf: zipfile.ZipFile, path: Path) -> str:
    names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    for key in NPZ_KEYS:
        if key in names:
            return key + ".npy"
    if len(names) == 1:
        return names[0] + ".npy"
    raise DataError(f"{path}: holds {names}; name the inputs array one of {list(NPZ_KEYS)}")


def _read_npy_header(f: IO[bytes], path: Path) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as exc:
        raise DataError(f"{path}: not a valid .npy array: {exc}") from exc
    return tuple(shape), np.dtype(dtype), bool(fortran)


def _check_row(path: Path, row_shape: tuple[int, ...], values: int, itemsize: int, row_values: int | None) -> None:
    """Refuse a declared row the model cannot take, or one too big to hold, before reading any of it."""
    if row_values is not None and values != row_values:
        raise DataError(f"{path}: declares rows of shape {row_shape} ({values} values), which does not fit "
                        f"the model: it takes {row_values} values per row")
    if values * itemsize > MAX_ROW_BYTES:
        raise DataError(f"{path}: declares rows of {values * itemsize} bytes, over the {MAX_ROW_BYTES}-byte "
                        "row limit")


def _stream_rows(f: IO[bytes], path: Path, batch_size: int, closers: list[Any],
                 row_values: int | None = None) -> tuple[int, Iterator[np.ndarray]]:
    """Batches from an open .npy stream (positioned at its magic string)."""
    try:
        shape, dtype, fortran = _read_npy_header(f, path)
        if fortran or dtype.hasobject or not shape or min(shape) < 0:
            raise DataError(f"{path}: need a C-ordered numeric array with a batch dimension, got shape {shape}")
        if len(shape) == 1 and row_values is not None and shape[0] == row_values != 1:
            shape = (1, shape[0])  # one flat sample
        row_shape = shape[1:]
        values = math.prod(row_shape)  # exact: np.prod would wrap around on a crafted shape
        _check_row(path, row_shape, values, dtype.itemsize, row_values)
    except BaseException:
        for c in closers:
            c.close()
        raise
    row_bytes = values * dtype.itemsize
    per_read = max(1, min(batch_size, MAX_BATCH_BYTES // max(row_bytes, 1)))

    def gen() -> Iterator[np.ndarray]:
        try:
            remaining = shape[0]
            while remaining:
                k = min(per_read, remaining)
                buf = f.read(k * row_bytes)
                if len(buf) != k * row_bytes:
                    raise DataError(f"{path} is truncated: {shape[0] - remaining + len(buf) // max(row_bytes, 1)} "
                                    f"of {shape[0]} rows")
                yield np.frombuffer(buf, dtype=dtype).reshape((k, *row_shape))
                remaining -= k
        finally:
            for c in closers:
                c.close()

    return shape[0], gen()


def _npz_batches(path: Path, batch_size: int, row_values: int | None) -> tuple[int, Iterator[np.ndarray]]:
    try:
        zf = zipfile.ZipFile(path)
        f = zf.open(_npz_member(zf, path))
    except (zipfile.BadZipFile, OSError, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable .npz: {exc}") from exc
    return _stream_rows(f, path, batch_size, [f, zf], row_values)


def _npy_batches(path: Path, batch_size: int, row_values: int | None) -> tuple[int, Iterator[np.ndarray]]:
    f = path.open("rb")
    return _stream_rows(f, path, batch_size, [f], row_values)


def _csv_rows(path: Path) -> Iterator[list[float]]:
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                yield [float(c) for c in row]
            except ValueError as exc:
                if line_no == 1:
                    continue  # a header row
                raise DataError(f"{path}:{line_no}: not a row of numbers: {exc}") from exc


def _csv_batches(path: Path, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    # One cheap counting pass first, so the output can be preallocated on disk. (A CSV declares no
    # shape: what it holds it costs in file size, and the model checks each batch's rows.)
    n = sum(1 for _ in _csv_rows(path))

    def gen() -> Iterator[np.ndarray]:
        batch: list[list[float]] = []
        for row in _csv_rows(path):
            batch.append(row)
            if len(batch) == batch_size:
                yield np.asarray(batch, dtype=np.float32)
                batch = []
        if batch:
            yield np.asarray(batch, dtype=np.float32)

    return n, gen()


def open_batches(path: Path, batch_size: int, row_values: int | None = None) -> tuple[int, Iterator[np.ndarray]]:
    """(number of rows, iterator over batches) for a .npy, .npz or .csv input file.

    `row_values`: how many values the model takes per row; a .npy/.npz that declares another row size
    is refused (DataError) before any row is read.
    """
    if not path.is_file():
        raise UsageError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _npy_batches(path, batch_size, row_values)
    if suffix == ".npz":
        return _npz_batches(path, batch_size, row_values)
    if suffix == ".csv":
        return _csv_batches(path, batch_size)
    raise UsageError(f"--input {path}: expected a .npy, .npz or .csv file")


def predict_file(
    runtime: ModelRuntime, input_path: Path, output_path: Path, *, batch_size: int = 256
) -> dict[str, Any]:
    """Write the model outputs for every input row to `output_path` (.npy); returns what was done."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if output_path.suffix.lower() != ".npy":
        raise UsageError(f"--output {output_path}: the output is a .npy file")
    n, batches = open_batches(input_path, batch_size, math.prod(runtime.sample_shape))
    tmp = output_path.with_name(f".{output_path.name}.partial")
    t0 = time.perf_counter()
    done = 0
    try:
        with tmp.open("wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (n, runtime.n_classes)})
            for batch in batches:
                try:
                    x = runtime.as_batch(batch)
                except InputError as exc:
                    raise DataError(f"{input_path}: rows {done}..{done + len(batch) - 1}: {exc}") from exc
                out.write(np.ascontiguousarray(runtime.run(x), dtype=np.float32).tobytes())
                done += len(x)
            if done != n:
                raise DataError(f"{input_path}: expected {n} rows, read {done}")
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(output_path)  # never leave a half-written output under the real name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    return {"output": str(output_path), "rows": n, "batch_size": batch_size, "seconds": round(seconds, 4),
            "rows_per_second": round(n / seconds, 1) if seconds > 0 else None,
            "model": runtime.info.as_dict()}
