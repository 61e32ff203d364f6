"""What machine this is: CPU model, the instruction sets that matter for int8, cores, library versions.

Every benchmark figure is stored with this, so numbers from different machines are never mixed up.
Lives in device_agent (stdlib only) so the agent can report it in its status too.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# Flags that decide how fast int8 (and bf16) matrix work is on this CPU.
INT8_FLAGS = (
    "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
    "asimddp", "i8mm", "sve",
)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def int8_isa(flags: set[str] | None = None) -> str:
    """The best int8 dot-product instruction set this CPU has, in words a report can print."""
    f = cpu_flags() if flags is None else flags
    if "amx_int8" in f:
        return "AMX-INT8"
    if "avx512_vnni" in f:
        return "AVX-512 VNNI"
    if "avx_vnni" in f:
        return "AVX-VNNI"
    if "avx512bw" in f:
        return "AVX-512BW (no VNNI)"
    if "avx2" in f:
        return "AVX2 (no VNNI)"
    if "i8mm" in f:
        return "Arm i8mm"
    if "asimddp" in f:
        return "Arm dot product"
    return "none known"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def host_info(packages: tuple[str, ...] = ("numpy", "onnxruntime", "onnx", "torch")) -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "int8_isa": int8_isa(flags),
        "isa_flags": sorted(flags.intersection(INT8_FLAGS)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: v for p in packages if (v := _version(p)) is not None},
    }
