"""`edge-agent predict` on crafted input files: a declared shape is checked before anything is allocated.

A 390 KiB .npz whose member declares one 400 MB row used to be inflated into memory (849 MiB peak)
before the row was refused; a 128-byte .npy declaring shape (1, 2**40) raised MemoryError (exit 1).
Each is now exit 2 naming the file and the shape, in a process that stays small.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from harness.processes import cli_env

pytestmark = pytest.mark.slow

# Runs the CLI as its only child and reports the child's peak RSS (ru_maxrss, KiB), so the figure
# is that one process's and not the largest of every subprocess this test session ever waited for.
_MEASURE = """
import json, resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def predict(bundle: Path, source: Path, out: Path) -> dict:
    argv = [sys.executable, "-m", "device_agent", "predict", "--bundle", str(bundle), "--input", str(source),
            "--output", str(out)]
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], env=cli_env(), capture_output=True, text=True,
                          timeout=300, check=True)
    return dict(json.loads(done.stdout))


def inflating_npz(path: Path, values: int) -> Path:
    """An .npz whose `inputs` member declares one row of `values` float32 zeros, stored deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("inputs.npy", "w", force_zip64=True) as f:
        f.write(_npy_header((1, values)))
        chunk = bytes(4 * 1024 * 1024)
        for _ in range(values * 4 // len(chunk)):
            f.write(chunk)
    return path


def test_an_npz_declaring_one_400_mb_row_is_refused_before_it_is_inflated(bundle_v1: Path, tmp_path: Path) -> None:
    source = inflating_npz(tmp_path / "bomb.npz", 100 * 1024 * 1024)  # one row of 400 MiB
    assert source.stat().st_size < 1024 * 1024
    result = predict(bundle_v1, source, tmp_path / "out.npy")
    assert result["rc"] == 2, result
    assert result["peak_kib"] < 300 * 1024, result["peak_kib"]  # the row alone would be 400 MiB
    message = result["stderr"].strip().splitlines()[-1]
    assert "bomb.npz" in message and "104857600 values" in message and "it takes 64 values per row" in message
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("shape", [(1, 2**40), (2**40, 64, 2**30), (3, 10), (-1, 64)])
def test_a_tiny_npy_declaring_an_impossible_row_is_exit_2_not_memory_error(bundle_v1: Path, tmp_path: Path,
                                                                          shape: tuple[int, ...]) -> None:
    source = tmp_path / "tiny.npy"
    try:
        source.write_bytes(_npy_header(shape))
    except ValueError:  # numpy refuses to even write a negative shape: craft the header text by hand
        header = _npy_header((7, 64)).replace(b"(7, 64)", b"(-1, 64)")
        source.write_bytes(header)
    result = predict(bundle_v1, source, tmp_path / "out.npy")
    assert result["rc"] == 2, result
    assert "MemoryError" not in result["stderr"] and "Traceback" not in result["stderr"]
    assert "tiny.npy" in result["stderr"]
    assert result["peak_kib"] < 300 * 1024, result["peak_kib"]


def test_well_formed_inputs_still_go_through(bundle_v1: Path, tmp_path: Path) -> None:
    from harness.bundles import digits_like_inputs

    x = digits_like_inputs(10)
    np.save(tmp_path / "rows.npy", x.reshape(10, -1))
    np.save(tmp_path / "one.npy", x[0].reshape(-1))  # one flat sample, 1-D
    for name, rows in (("rows.npy", 10), ("one.npy", 1)):
        result = predict(bundle_v1, tmp_path / name, tmp_path / f"out-{name}")
        assert result["rc"] == 0, result
        assert np.load(tmp_path / f"out-{name}").shape[0] == rows
