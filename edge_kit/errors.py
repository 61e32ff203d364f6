"""Server-side view of the shared exception tree (defined in ``device_agent.errors``)."""

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
    GateFailedError,
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
    "GateFailedError",
    "InputError",
    "TrainingInterrupted",
    "UsageError",
    "VerificationError",
]
