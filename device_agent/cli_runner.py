"""The one command-line runner of both programs, `edge-kit` and `edge-agent` (docs/architecture.md section 3).

Each program builds its argparse parser (with `Parser`, so usage errors come here instead of
exiting) and a dispatch function; `run_cli` does the rest the same way for both:

- logging to stderr, configured here and only here (library code never configures logging);
- errors -> exit codes: an `EdgeKitError` exits with its own code, a usage error 2, Ctrl-C 130,
  anything else 1; one line on stderr, the traceback only with `--debug`;
- the `--json` contract: stdout holds exactly one JSON object whatever happens, the result on
  success and `{"ok": false, "error", "exit_code", ...}` on ANY error, the unexpected ones too;
- help pages: every page ends with the exit codes (`EXIT_CODES`, written once for both programs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import Any, NoReturn

from device_agent.errors import (
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    EXIT_VERIFICATION,
    EdgeKitError,
    UsageError,
)

EXIT_CTRL_C = 130  # the shell's 128 + SIGINT
# What each exit code means to the person at the shell; `exit_codes_epilog` prints the ones a program uses.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (run again with --debug for the traceback)",
    EXIT_USAGE: "bad usage, bad config or bad input: the message names the key or file and what is allowed",
    EXIT_GATE_FAILED: "build: the accuracy gate failed; no bundle written, the report names the layers to blame",
    EXIT_VERIFICATION: "verification failed: tampered, truncated, wrong key or hash mismatch (the member is named)",
    EXIT_INTERRUPTED: "train: stopped by SIGTERM after saving a checkpoint; run it again to resume",
    EXIT_CTRL_C: "interrupted (Ctrl-C)",
}
Dispatch = Callable[[argparse.Namespace], "dict[str, Any] | None"]
# Fields an error may carry (the failing bundle member, the config key, the report written) for --json.
ERROR_FIELDS = ("member", "key", "report")


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting, so `--json` still gets its object.

    Descriptions and epilogs keep their line breaks (the exit-code table is a table).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def package_version() -> str:
    """The installed edge-kit distribution's version (the agent ships in the same distribution)."""
    try:
        return metadata.version("edge-kit")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def exit_codes_epilog(codes: Iterable[int]) -> str:
    """The "exit codes:" section that ends every help page of a program, for the codes it can return."""
    lines = ["exit codes:"] + [f"  {code:<4}{EXIT_CODES[code]}" for code in sorted(codes)]
    return "\n".join(lines)


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (subcommands, and their subcommands), depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found.append(child)
                found.extend(subcommand_parsers(child))
    return found


def end_help_with(parser: argparse.ArgumentParser, epilog: str) -> argparse.ArgumentParser:
    """Put `epilog` at the end of `parser`'s help page and of every subcommand's."""
    for p in [parser, *subcommand_parsers(parser)]:
        p.epilog = epilog
    return parser


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object describing the result on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")


def add_verify_command(sub: Any, help_text: str, description: str) -> argparse.ArgumentParser:
    """`verify BUNDLE [--pubkey PUB.pem]`, the same contract in both programs (docs/architecture.md section 3)."""
    p: argparse.ArgumentParser = sub.add_parser("verify", help=help_text, description=description)
    p.add_argument("bundle", help="the .edgebundle file to check")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM); without it only hashes are checked")
    add_common_flags(p)
    return p


def configure_logging(debug: bool, quiet: bool, noisy: Iterable[str] = ()) -> None:
    """stderr logging for a CLI process; `noisy` third-party loggers are held at WARNING unless --debug."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        for name in noisy:
            logging.getLogger(name).setLevel(logging.WARNING)


def error_document(exc: BaseException, exit_code: int) -> dict[str, Any]:
    """The one JSON object printed for a failed command."""
    message = str(exc) if isinstance(exc, EdgeKitError) else f"{type(exc).__name__}: {exc}"
    doc: dict[str, Any] = {"ok": False, "error": message, "exit_code": exit_code}
    for name in ERROR_FIELDS:
        if isinstance(exc, EdgeKitError) and getattr(exc, name, None) is not None:
            doc[name] = str(getattr(exc, name))
    return doc


def run_cli(program: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None, dispatch: Dispatch, *,
            command_of: Callable[[argparse.Namespace], str | None] = lambda a: a.command,
            noisy_loggers: Iterable[str] = ()) -> int:
    """Parse `argv`, run the command `dispatch` picks, and return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv  # known before parsing, so even a usage error answers in JSON
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        return _fail(program, exc, EXIT_USAGE, want_json, debug=False)
    want_json = bool(getattr(args, "json", want_json))
    debug = bool(getattr(args, "debug", debug))
    if command_of(args) is None:
        parser.print_help(sys.stderr)
        return _fail(program, UsageError("no command given"), EXIT_USAGE, want_json, debug=False)
    configure_logging(debug, bool(getattr(args, "quiet", False)), noisy_loggers)
    try:
        result = dispatch(args) or {}
    except EdgeKitError as exc:
        return _fail(program, exc, exc.exit_code, want_json, debug)
    except KeyboardInterrupt as exc:
        return _fail(program, exc, EXIT_CTRL_C, want_json, debug, "interrupted")
    except Exception as exc:  # the one place that turns surprises into exit 1
        return _fail(program, exc, EXIT_UNEXPECTED, want_json, debug)
    code = int(result.get("exit_code", 0))
    if want_json:
        print(json.dumps(result if "ok" in result else {"ok": code == 0, **result}, default=str))
    return code


def _fail(program: str, exc: BaseException, code: int, want_json: bool, debug: bool, line: str | None = None) -> int:
    if debug:
        traceback.print_exception(exc)
    if line is None:
        if isinstance(exc, EdgeKitError):
            line = f"error: {exc}"
        else:
            line = f"unexpected error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)"
    print(f"{program}: {line}", file=sys.stderr)
    if want_json:
        print(json.dumps(error_document(exc, code), default=str))
    return code
