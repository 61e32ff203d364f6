"""edge-kit device agent: verifies and runs a bundle, summarises what it sees, reports over MQTT.

The embedded API's front door::

    from device_agent import Agent, VerificationError

    agent = Agent("/var/lib/edge-agent/bundles", public_key=key, model_name="digits")
    prediction = agent.predict(batch)

The names below are imported on first use (PEP 562 `__getattr__`): `import device_agent.errors`, the
CLI's `--help` and the fleet server's use of the wire formats do not pay for ONNX Runtime.
Subpackages: `bundle` (which bundle may serve), `http` (serving), `monitoring` (what the model
sees), `uplink` (getting summaries out).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Agent", "EdgeKitError", "InputError", "LoadedModel", "Prediction", "UsageError", "VerificationError",
    "load_model",
]

_HOMES = {
    "Agent": "device_agent.agent",
    "LoadedModel": "device_agent.agent",
    "Prediction": "device_agent.agent",
    "load_model": "device_agent.agent",
    "EdgeKitError": "device_agent.errors",
    "InputError": "device_agent.errors",
    "UsageError": "device_agent.errors",
    "VerificationError": "device_agent.errors",
}

if TYPE_CHECKING:
    from device_agent.agent import Agent, LoadedModel, Prediction, load_model
    from device_agent.errors import EdgeKitError, InputError, UsageError, VerificationError


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
