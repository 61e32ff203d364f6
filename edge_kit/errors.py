"""Server-side view of the shared exception tree (defined in ``device_agent.errors``).

The accuracy gate's error, ``GateFailedError`` (exit 3), lives with the gate in ``edge_kit.compile.gate``
because it carries the gate's result, which only the build server knows.
"""

from device_agent.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    EXIT_VERIFICATION,
    ConfigError,
    DataError,
    EdgeKitError,
    InputError,
    TrainingInterrupted,
    UsageError,
    VerificationError,
)

__all__ = [
    "EXIT_GATE_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "EXIT_VERIFICATION",
    "ConfigError",
    "DataError",
    "EdgeKitError",
    "InputError",
    "TrainingInterrupted",
    "UsageError",
    "VerificationError",
]
