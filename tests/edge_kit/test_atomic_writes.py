"""Every file edge-kit publishes is written through `device_agent.atomic`: a crash or a full disk mid-write
leaves the previous file (or none) under the real name, never a truncated one that a later step, a
device or MLflow reads back as if it were whole.

This reads the source of `edge_kit/` for the calls that write a file by name (`Path.write_text`,
`write_bytes`, `open(..., "w")`, `np.save*`, `torch.save`, `onnx.save`, `savefig`, ...). Each one that
remains is listed below with why it may write directly: scratch files in a private temporary folder,
logs, or a file that is rewritten whole on every start. Writes into an open file object (the one
`atomic_file` yields) are fine and are not flagged.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PATH_WRITERS = {"write_text", "write_bytes", "savefig"}
MODULE_WRITERS = {  # function -> the names it is called on that make it a file writer
    "save": {"np", "numpy", "torch", "onnx", "program"}, "savez": {"np", "numpy"},
    "savez_compressed": {"np", "numpy"}, "save_model": {"onnx"},
}
FILE_OBJECTS = {"f", "buf", "buffer", "handle"}  # what the project names open file objects

# (module path, source text of the call's first line, stripped) -> why it may write directly
ALLOWED: dict[tuple[str, str], str] = {
    ("edge_kit/fleet/captures_export.py", "np.save(part, np.stack(self._rows).astype(np.float32), allow_pickle=False)"):
        "a scratch part inside the export's DIR.tmp, which replaces DIR only once every shard is written",
    ("edge_kit/fleet/captures_export.py", 'with (self.folder / name).open("wb") as f:'):
        "a shard inside the export's DIR.tmp, which replaces DIR only once every shard is written",
    ("edge_kit/train/export.py", 'program.save(str(written), external_data=False)'):
        "the exporter writes into a private temporary folder; the bytes are then published atomically",
    ("edge_kit/config.py", 'marker.write_text("# Created by edge-kit: pipeline state (snapshot split, '
                           'checkpoints, MLflow store).\\n*\\n")'):
        "a constant .gitignore marker inside .edgekit/, rewritten whenever it is missing",
    ("edge_kit/ship/build.py", "shipped_path.write_bytes(model_bytes)"):
        "scratch copy in the build's temporary folder, read back to compute the reference histograms",
    ("edge_kit/ship/registry.py", 'path.write_text(report_md, encoding="utf-8")'):
        "scratch file in a temporary folder, uploaded to MLflow as an artifact",
    ("edge_kit/bench/sources.py", "int8_file.write_bytes(bundle.model_bytes)"):
        "scratch copy in the benchmark's private work folder, for the worker processes",
    ("edge_kit/bench/runner.py", "np.savez(data_path, **arrays)  # type: ignore[arg-type]"):
        "scratch inputs in the benchmark's private work folder, for the worker processes",
    ("edge_kit/bench/runner.py", 'with stderr_path.open("wb") as stderr:'):
        "a worker's stderr, captured in the benchmark's private work folder",
    ("edge_kit/bench/runner.py", 'job.write_text(json.dumps({**engine.to_json(), "data": str(data_path), '
                                 '"settings": settings}))'):
        "scratch job description in the benchmark's private work folder",
    ("edge_kit/compile/quantize/ort.py", "onnx.save(model, str(out))"):
        "an intermediate model in the build's temporary folder",
    ("edge_kit/compile/quantize/ort_quantizer.py",
     "onnx.save(keep_float(onnx.load(str(plain)), float_tensors), str(out))"):
        "a candidate model in the build's temporary folder",
    ("edge_kit/compile/quantize/inc.py", "onnx.save(folded, str(int8_path))"):
        "the INC candidate in the build's temporary folder",
}
# The demo writes its own throwaway project, broker config and logs under a folder it creates.
SCRATCH_PACKAGES = ("edge_kit/demo/",)


def direct_writes(path: Path) -> list[tuple[int, str]]:
    """(line, first line of the call) of each call that writes a file given by name, in line order.

    Appending (`open(..., "a")`) is not publishing: lock files, logs, and `.part` files that are renamed
    into place when complete.
    """
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if name in PATH_WRITERS:
            writes = True
        elif name in MODULE_WRITERS:
            writes = owner in MODULE_WRITERS[name]
        elif name == "open":
            # open(path, mode) or path.open(mode)
            position = 1 if isinstance(func, ast.Name) or owner in ("os", "io") else 0
            modes = [a for a in node.args[position:position + 1]] + [k.value for k in node.keywords if k.arg == "mode"]
            writes = any(isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wx")
                         for m in modes)
        else:
            writes = False
        target = node.args[0] if node.args else None
        if name == "savefig" and isinstance(target, ast.Name) and target.id in FILE_OBJECTS:
            writes = False
        if name in MODULE_WRITERS and any(isinstance(a, ast.Name) and a.id in FILE_OBJECTS for a in node.args[:2]):
            writes = False  # np.savez(f, ...), torch.save(obj, f): into an open file object
        if writes:
            found.append((node.lineno, lines[node.lineno - 1].strip()))
    return sorted(found)


def sources() -> list[Path]:
    return [p for p in sorted((REPO / "edge_kit").rglob("*.py"))
            if not str(p.relative_to(REPO)).startswith(SCRATCH_PACKAGES)]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_published_files_are_written_atomically(path: Path) -> None:
    rel = str(path.relative_to(REPO))
    direct = [f"line {line}: {text}" for line, text in direct_writes(path) if (rel, text) not in ALLOWED]
    assert not direct, f"{rel} writes files directly (use device_agent.atomic, or list why not): {direct}"


def test_every_allowed_write_still_exists() -> None:
    """An exception whose call is gone is removed from the list, so the list stays the truth."""
    present = {(str(p.relative_to(REPO)), text) for p in sources() for _, text in direct_writes(p)}
    assert sorted(set(ALLOWED) - present) == []


def test_the_check_flags_direct_writes_and_passes_atomic_ones(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import json, numpy as np, torch\n"
        "from device_agent.atomic import atomic_file\n"
        "def publish(out, doc, arrays, fig):\n"
        "    (out / 'r.json').write_text(json.dumps(doc))\n"
        "    np.savez(out / 'a.npz', **arrays)\n"
        "    with open(out / 'x.txt', 'w') as h:\n"
        "        h.write('x')\n"
        "    with (out / 'y.txt').open(mode='wb') as h:\n"
        "        h.write(b'y')\n"
        "    fig.savefig(out / 'c.png')\n"
        "    with atomic_file(out / 'b.npz') as f:\n"
        "        np.savez(f, **arrays)\n"
        "        torch.save(doc, f)\n"
        "    with open(out / 'in.txt') as h, (out / 'log').open('a') as log:\n"
        "        log.write(h.read())\n")
    assert [line for line, _ in direct_writes(module)] == [4, 5, 6, 8, 10]
