"""Is the int8 model worth shipping on this host? Compare it with fp32 and say why when it is not.

An int8 model that runs slower than the fp32 model it came from is a real and common outcome, and
it must be flagged loudly rather than buried in a table. The likely reasons, in the order checked:
the CPU has no int8 dot-product instructions (VNNI, AMX, Arm dot product/i8mm), the bundle was
quantized for another target, the accuracy gate kept nodes in fp32 (each boundary adds conversions),
or the model is so small that per-operator overhead and the Q/DQ conversions outweigh the cheaper
arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Flags (as in /proc/cpuinfo, see device_agent.host.INT8_FLAGS) that give fast int8 dot products.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
# How much slower (relative, on medians) int8 may be before it counts: below this is host noise.
SLOWER_TOLERANCE = 0.05
# Under this fp32 batch-1 latency a model is "tiny": fixed per-call costs dominate its time.
TINY_MODEL_MS = 1.0

_TARGET_ARCH = {"x86-vnni": "x86_64", "x86-avx2": "x86_64", "arm64": "aarch64"}
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


@dataclass(frozen=True)
class Flag:
    level: str  # "warning" (shown at the top of the report) or "note"
    code: str
    message: str
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out


def slower_settings(int8: dict[str, Any], fp32: dict[str, Any], tolerance: float = SLOWER_TOLERANCE) -> list[str]:
    """The measured settings where int8 was more than `tolerance` slower than fp32 (medians compared)."""
    slower: list[str] = []
    fp32_latency = {e["threads"]: e for e in fp32.get("latency_ms", [])}
    for entry in int8.get("latency_ms", []):
        other = fp32_latency.get(entry["threads"])
        if other and entry["p50"] > other["p50"] * (1 + tolerance):
            slower.append(f"batch-1 latency p50, {entry['threads']} thread(s): "
                          f"{entry['p50']:.3f} ms int8 vs {other['p50']:.3f} ms fp32")
    fp32_tput = {(e["batch"], e["threads"]): e for e in fp32.get("throughput", [])}
    for entry in int8.get("throughput", []):
        other = fp32_tput.get((entry["batch"], entry["threads"]))
        if other and entry["items_per_s"] * (1 + tolerance) < other["items_per_s"]:
            slower.append(f"throughput batch {entry['batch']}, {entry['threads']} thread(s): "
                          f"{entry['items_per_s']:.0f}/s int8 vs {other['items_per_s']:.0f}/s fp32")
    return slower


def likely_reasons(int8: dict[str, Any], fp32: dict[str, Any], host: dict[str, Any],
                   quantization: dict[str, Any] | None) -> list[str]:
    """Why int8 may be slow here, most likely first; always at least one reason."""
    reasons: list[str] = []
    flags = set(host.get("isa_flags", []))
    isa = host.get("int8_isa", "unknown")
    if not flags.intersection(INT8_DOT_FLAGS):
        reasons.append(
            f"this CPU has no VNNI or dot-product int8 instructions (best int8 ISA: {isa}); ONNX Runtime's int8 "
            "kernels then widen to 16-bit multiply-adds that are often no faster than fp32 FMA: ship the fp32 model "
            "to such devices, or measure on the real target"
        )
    q = quantization or {}
    target = q.get("target")
    host_arch = _ARCH_ALIASES.get(str(host.get("machine", "")).lower())
    if target in _TARGET_ARCH and host_arch and _TARGET_ARCH[target] != host_arch:
        reasons.append(
            f"wrong format for this host: the bundle was quantized for target '{target}' "
            f"({_TARGET_ARCH[target]}) but this host is {host_arch}; build with the matching quantize.target"
        )
    elif target == "x86-vnni" and "avx512_vnni" not in flags and "avx_vnni" not in flags and host_arch == "x86_64":
        reasons.append("the bundle targets x86-vnni but this CPU has no VNNI: build with quantize.target = 'x86-avx2'")
    elif target == "x86-avx2" and flags.intersection({"avx512_vnni", "avx_vnni", "amx_int8"}):
        reasons.append(
            "the bundle targets x86-avx2 (reduce_range, 7-bit weights) on a VNNI host: build with "
            "quantize.target = 'x86-vnni' to use the faster kernels"
        )
    if q.get("format") and str(q["format"]).upper() not in ("QDQ",):
        reasons.append(
            f"quantization format {q['format']!r}: ONNX Runtime's fused int8 kernels are matched on QDQ models"
        )
    excluded = [*(q.get("excluded_nodes") or []), *(f"tensor {t}" for t in q.get("float_tensors") or [])]
    if excluded:
        reasons.append(
            f"the accuracy gate kept {len(excluded)} node(s)/tensor(s) in float ({', '.join(map(str, excluded[:5]))}"
            f"{', ...' if len(excluded) > 5 else ''}); every int8/fp32 boundary adds Quantize/DequantizeLinear work"
        )
    fp32_p50 = min((e["p50"] for e in fp32.get("latency_ms", [])), default=None)
    if fp32_p50 is not None and fp32_p50 < TINY_MODEL_MS:
        reasons.append(
            f"the model is tiny (fp32 batch-1 latency {fp32_p50:.3f} ms): per-operator overhead and the "
            "Quantize/DequantizeLinear conversions outweigh the cheaper int8 arithmetic; int8 pays off on "
            "larger convolutions and matrix multiplications"
        )
    if not reasons:
        reasons.append(
            "no structural reason found: the host may be busy (shared machine), so rerun without --quick; if it "
            "persists, profile with ONNX Runtime's profiler to find the slow operators"
        )
    return reasons


def int8_verdict(figures: dict[str, dict[str, Any]], host: dict[str, Any],
                 manifest: dict[str, Any]) -> list[Flag]:
    """Flags for the report: int8 slower than fp32 (loud), and accuracy lost beyond the gate's budget."""
    flags: list[Flag] = []
    int8, fp32 = figures.get("int8"), figures.get("fp32")
    if not int8 or not fp32:
        return flags
    slower = slower_settings(int8, fp32)
    if slower:
        measured = len(int8.get("latency_ms", [])) + len(int8.get("throughput", []))
        flags.append(Flag(
            "warning", "int8_slower_than_fp32",
            f"INT8 IS SLOWER THAN FP32 ON THIS HOST in {len(slower)} of {measured} measured settings: "
            + "; ".join(slower)
            + (f" (in the other {measured - len(slower)} it is not slower)" if measured > len(slower) else ""),
            tuple(likely_reasons(int8, fp32, host, manifest.get("quantization"))),
        ))
    gate = manifest.get("gate") or {}
    if int8.get("accuracy") is not None and fp32.get("accuracy") is not None and gate.get("max_drop") is not None:
        drop = float(fp32["accuracy"]) - float(int8["accuracy"])
        if drop > float(gate["max_drop"]) + 1e-12:
            flags.append(Flag(
                "warning", "accuracy_drop_over_budget",
                f"int8 loses {drop:.4f} accuracy against fp32 on the held-out split here, over the gate's "
                f"max_drop {gate['max_drop']} (the build measured {gate.get('drop')})",
                ("ONNX Runtime kernels differ between hosts; check the build host's figures against these",),
            ))
    return flags
