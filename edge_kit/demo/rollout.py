"""The demo's deployments: a retrained bundle rolled out canary -> promote through the fleet server's API,
and (with `--bad-bundle`) a bundle that verifies and passes its self-test but whose predictions skew.

The canary is drawn from the fleet's devices with a seed; the demo picks a seed whose canary is a clean
device. A device fed shifted inputs differs from every reference and from the clean control devices, so
as a canary it would (rightly) fail on input drift or on the predicted classes whatever the bundle.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle.format import MANIFEST, MODEL, SELFTEST, SIGNATURE, read_bundle, write_bundle
from device_agent.bundle.signing import load_private_key
from device_agent.bundle.versions import version_key
from edge_kit.demo.processes import http_json


def newest_bundle(folder: Path) -> Path:
    """The bundle of the highest version in the folder (what a retraining just wrote)."""
    bundles = [(version_key(read_bundle(p).version), p) for p in folder.glob("*.edgebundle")]
    return max((k, p) for k, p in bundles if k is not None)[1]


def clean_canary_seed(devices: list[str], clean: set[str]) -> int:
    """A seed whose one-device canary sample (the fleet server's draw: `random.Random(seed).sample`) is clean."""
    targets = sorted(devices)
    return next(seed for seed in range(1000) if random.Random(seed).sample(targets, 1)[0] in clean)


def deploy(dashboard: str, bundle: Path, seed: int, canary_windows: int = 2) -> dict[str, Any]:
    """Deploy a bundle of the fleet server's --bundles folder to every device: 1 canary, auto-promote."""
    return dict(http_json(f"{dashboard}api/deployments", {
        "bundle_path": bundle.name, "canary": 1, "canary_windows": canary_windows, "auto_promote": True,
        "seed": seed}))


def deployment(dashboard: str, dep_id: str) -> dict[str, Any]:
    return dict(http_json(f"{dashboard}api/deployments/{dep_id}"))


def deployments(dashboard: str) -> list[dict[str, Any]]:
    """Every deployment the fleet server holds, oldest first."""
    return list(http_json(f"{dashboard}api/deployments").get("deployments", []))


def skewed_bundle(good: Path, out_dir: Path, key: Path, version: str) -> Path:
    """A copy of `good` whose logits get +12 on class 0: verified, signed and self-tested like any bundle
    (its self-test records the skewed outputs), but it predicts 0 far more often than the model it replaces
    (on the digits model about 60% of inputs instead of 10%)."""
    import onnx
    from onnx import helper, numpy_helper

    bundle = read_bundle(good)
    model = onnx.load_from_string(bundle.members[MODEL])
    graph = model.graph
    out = graph.output[0].name
    k = graph.output[0].type.tensor_type.shape.dim[-1].dim_value or 10
    bias = np.zeros(k, dtype=np.float32)
    bias[0] = 12.0
    for node in graph.node:  # the old output becomes an intermediate; the Add below writes the output
        node.output[:] = [f"{o}_unskewed" if o == out else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(bias, "demo_skew_bias"))
    graph.node.append(helper.make_node("Add", [f"{out}_unskewed", "demo_skew_bias"], [out], name="demo_skew"))
    selftest = np.load(io.BytesIO(bundle.members[SELFTEST]))
    buf = io.BytesIO()
    np.savez(buf, inputs=selftest["inputs"], outputs=(selftest["outputs"] + bias).astype(np.float32))
    members = {k2: v for k2, v in bundle.members.items() if k2 not in (MANIFEST, SIGNATURE)}
    members[MODEL] = model.SerializeToString()
    members[SELFTEST] = buf.getvalue()
    return write_bundle(out_dir, {**bundle.manifest, "version": version}, members,
                        signing_key=load_private_key(key))
