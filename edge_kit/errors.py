"""Server-side view of the shared exception tree (drawn in ``device_agent.errors``), plus the errors
only the server raises.

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
    PayloadError,
    SpoolError,
    TrainingInterrupted,
    UsageError,
    VerificationError,
)


class AlertError(EdgeKitError, ValueError):
    """An alert action that does not apply (unknown id, wrong state); `status` is the HTTP code."""

    exit_code = EXIT_USAGE

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


__all__ = [
    "EXIT_GATE_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "EXIT_VERIFICATION",
    "AlertError",
    "ConfigError",
    "DataError",
    "EdgeKitError",
    "InputError",
    "PayloadError",
    "SpoolError",
    "TrainingInterrupted",
    "UsageError",
    "VerificationError",
]
