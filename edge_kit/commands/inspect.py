"""`edge-kit inspect BUNDLE [--pubkey PUB] [--json]`: what a bundle holds and where it came from.

Hashes are always checked; the signature only with --pubkey, and the output says which, first. Every
string from the manifest is untrusted until the signature is verified (and even then is data, not
terminal input): control and formatting characters are printed escaped, so a manifest cannot move the
cursor, recolour or rewrite the screen, or fake a line of its own such as "signature verified".
"""

from __future__ import annotations

import argparse
import unicodedata
from typing import Any

# Control (Cc), format (Cf: bidi overrides, zero-width), line/paragraph separators and lone surrogates.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: str) -> str:
    """`text` with every character that could steer a terminal written as a visible escape (\\x1b)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def printable_tree(value: Any) -> Any:
    """`printable` applied to every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_tree(v) for v in value]
    return value


def signature_state(signed: bool, verified_by: str | None) -> str:
    """What can honestly be said of the signature: a signature nobody checked proves nothing."""
    if verified_by is not None:
        return f"signature verified (key {verified_by})"
    return "signature present, not verified" if signed else "UNSIGNED"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.bundle.format import read_bundle
    from device_agent.bundle.signing import load_public_key

    pubkey = getattr(args, "pubkey", None)
    bundle = read_bundle(args.bundle, public_key=load_public_key(pubkey) if pubkey else None)
    m = bundle.manifest
    info = {
        "bundle": str(bundle.path),
        "name": bundle.name,
        "version": bundle.version,
        "created_at": m.get("created_at"),
        "signed": bundle.signed,
        "signature_verified": bundle.signed_by is not None,
        "signed_by": bundle.signed_by,
        "signature": signature_state(bundle.signed, bundle.signed_by),
        "model": m.get("model", {}),
        "members": {name: len(data) for name, data in sorted(bundle.members.items())},
        "quantization": m.get("quantization", {}),
        "gate": m.get("gate", {}),
        "provenance": m.get("provenance", {}),
        "monitoring": {"channels": len(m.get("monitoring", {}).get("channels", [])),
                       "untestable": _untestable(bundle.reference)},
    }
    if not getattr(args, "json", False):
        print(render_safely(printable_tree(info)))
    return info


def render_safely(info: dict[str, Any]) -> str:
    """`render`, or the signature line and a pointer to --json when the manifest's fields have types no
    build writes (a crafted manifest must not turn inspect into a traceback)."""
    try:
        return render(info)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        return (f"[{info['signature']}] {info['name']} {info['version']}\n"
                f"  manifest  fields of unexpected types ({printable(str(exc))}); see --json")


def _untestable(reference: dict[str, Any] | None) -> dict[str, str]:
    """Channels the fleet cannot test, with the reason (bundles from before the reason was stored too)."""
    from device_agent.monitoring.reference import Reference

    if not reference:
        return {}
    try:
        return Reference.from_json(reference).untestable()
    except (KeyError, TypeError, ValueError):
        return {}


def render(info: dict[str, Any]) -> str:
    model, q, g, p = info["model"], info["quantization"], info["gate"], info["provenance"]
    git, env, data = p.get("git", {}), p.get("environment", {}), p.get("data", {})
    calib, ml = p.get("calibration", {}), p.get("mlflow", {})
    lines = [
        # What was verified comes first, before any string the manifest chose.
        f"[{info['signature']}] {info['name']} {info['version']}  (created {info['created_at']})",
        f"  model     {model.get('precision')} sha256 {str(model.get('sha256'))[:16]}…  "
        f"inputs {[(i['name'], i['shape']) for i in model.get('inputs', [])]}",
        f"  labels    {model.get('labels')}",
        f"  quantize  backend {q.get('backend')}, {q.get('format')}, target {q.get('target')}, "
        f"per-channel {q.get('per_channel')}, fp32 nodes {q.get('excluded_nodes') or 'none'}"
        + (f", float tensors {q['float_tensors']}" if q.get("float_tensors") else ""),
        f"  gate      {'PASSED' if g.get('passed') else 'FAILED'}: {g.get('metric')} fp32 {g.get('fp32', 0):.4f} "
        f"int8 {g.get('int8', 0):.4f} drop {g.get('drop', 0):.4f} (max {g.get('max_drop')}), "
        f"{len(g.get('rounds', []))} round(s)",
        *([f"  int8      {100 * q['int8_coverage']:.1f}% of multiply-accumulates run in int8"]
          if "int8_coverage" in q else []),
        *_candidate_lines(q),
        f"  git       {git.get('commit')} dirty={git.get('dirty')}",
        f"  env       python {env.get('python')}, lock {str(env.get('lock_sha256'))[:16]}…",
        f"  data      {data.get('path')} md5 {data.get('dvc_md5')}",
        f"  calib     {calib.get('method')} x{calib.get('samples')} ids {str(calib.get('ids_sha256'))[:16]}…",
        f"  mlflow    run {ml.get('run_id')} at {ml.get('tracking_uri')}",
        f"  monitor   {info['monitoring']['channels']} channels"
        + "".join(f"; untestable {k}: {v}" for k, v in info["monitoring"].get("untestable", {}).items()),
        "  members   " + ", ".join(f"{k} ({v} B)" for k, v in info["members"].items()),
    ]
    return "\n".join(lines)


def _candidate_lines(q: dict[str, Any]) -> list[str]:
    """The candidate search: what shipped, on which host, and every candidate with why it did not."""
    search = q.get("search")
    if not search:
        return []
    host = search.get("host") or {}
    chosen = search.get("chosen", {})
    lines = [f"  search    shipped {chosen.get('name')!r} ({chosen.get('precision')}); objective "
             f"{search.get('objective')}, batch {search.get('batch_size')}, {search.get('threads')} thread(s), "
             f"on {host.get('cpu')} ({host.get('int8_isa')})" + (" [replayed]" if search.get("replayed") else "")]
    for c in search.get("candidates", []):
        p50, p95, tput = c.get("latency_p50_ms"), c.get("latency_p95_ms"), c.get("throughput_per_s")
        timing = f"p50 {p50:.4f} ms p95 {p95:.4f} ms {tput:.0f}/s" if p50 is not None else "not timed"
        lines.append(f"    {c.get('name')}: metric {c.get('metric', 0):.4f}, int8 MACs "
                     f"{100 * c.get('int8_coverage', 0):.0f}%, {timing}, {c.get('size_bytes')} B"
                     f" - {c.get('rejected') or 'shipped'}")
    return lines
