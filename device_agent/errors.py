"""The one exception tree of edge-kit, with the documented exit codes.

It lives in ``device_agent`` because the agent may not import ``edge_kit``; the server side
re-exports it from ``edge_kit.errors``. Every error carries the exit code the CLIs return and a
message that says what went wrong and how to fix it. Mixins (ValueError, RuntimeError) stay where
callers catch the builtin. The tree, with the exit code and where each class is defined (this module
unless named; `tests/device_agent/test_agent_docs_tables.py` keeps the drawing complete)::

    EdgeKitError (1)
    ├── UsageError (2)
    │   ├── ConfigError (2)                        a config key or flag: `.key`
    │   ├── DataError (2)
    │   │   └── CalibrationError (2)               calibration.errors
    │   ├── InputError (2)                         an inference request
    │   ├── SpoolUnavailableError (2)              spool locked or unreadable: device_agent.durable_sqlite
    │   └── ForeignCheckpointError (2)             edge_kit.train.checkpoint
    ├── PayloadError (2), ValueError               a summary or status message: `.kind`
    ├── AlertError (2), ValueError                 an alert action: `.status` (HTTP); edge_kit.errors
    ├── SpoolError (1), RuntimeError               the agent's disk spool cannot store
    ├── GateFailedError (3)                        edge_kit.compile.gate (carries the gate's result)
    ├── VerificationError (4)                      a bundle: `.member`
    ├── ReferenceConflict (4)                      edge_kit.fleet.reference_index
    ├── TrainingInterrupted (75)
    ├── DownloadFailed (1)                         a bundle download, `.permanent`: device_agent.deploy.download
    ├── ExportMismatchError (1)                    edge_kit.train.export
    ├── CheckpointWriteError (1)                   edge_kit.train.checkpoint
    ├── RayTrainingFailed (1)                      edge_kit.train.ray_engine
    ├── ServerError (1)                            fleet server failed or unreachable: edge_kit.commands.fleet_client
    ├── ExportProtocolError (1)                    not a captures export page: edge_kit.fleet.captures_export
    ├── ShardRefused (1)                           a refused shard, its own code: edge_kit.ship.batch_predict
    └── WorkerFailed (1)                           edge_kit.bench.runner

Exit codes (docs/architecture.md section 3): 0 success, 1 unexpected error, 2 bad usage or bad config,
3 accuracy gate failed, 4 verification failed, 75 training interrupted by SIGTERM (resumable),
130 interrupted by Ctrl-C (`cli_runner.EXIT_CTRL_C`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3
EXIT_VERIFICATION = 4
# EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted spot run should do.
EXIT_INTERRUPTED = 75


class EdgeKitError(Exception):
    """Base of every error edge-kit raises on purpose."""

    exit_code: int = EXIT_UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(EdgeKitError):
    """Bad command-line usage or bad input file."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config key is unknown, of the wrong type, or points at something missing."""

    def __init__(self, key: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"config key '{key}': {message}", hint=hint)
        self.key = key


class DataError(UsageError):
    """Input data is missing, corrupt, or does not match its recorded snapshot."""


class VerificationError(EdgeKitError):
    """A bundle failed verification: bad signature, hash mismatch, truncation, wrong key."""

    exit_code = EXIT_VERIFICATION

    def __init__(self, member: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{member}: {message}", hint=hint)
        self.member = member


class InputError(UsageError):
    """An inference request has the wrong shape, dtype, or non-finite values."""


class PayloadError(EdgeKitError, ValueError):
    """A summary or status payload that cannot be accepted; `kind` names the class of problem for metrics."""

    exit_code = EXIT_USAGE

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class SpoolError(EdgeKitError, RuntimeError):
    """The spool could not store a window (disk full, read-only, I/O error)."""


class TrainingInterrupted(EdgeKitError):
    """Training received SIGTERM, saved a checkpoint and stopped; `--resume auto` continues it."""

    exit_code = EXIT_INTERRUPTED
