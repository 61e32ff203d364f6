"""The one CLI runner, for both programs: exit codes and the `--json` contract (one object, on any error)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from device_agent.errors import EXIT_UNEXPECTED, EXIT_USAGE, EXIT_VERIFICATION, VerificationError
from harness.processes import run_cli

PROGRAMS = ["edge-kit", "edge-agent"]


def _main(program: str) -> Callable[[list[str]], int]:
    if program == "edge-kit":
        from edge_kit.cli import main
    else:
        from device_agent.cli import main
    return main


def _break_dispatch(program: str, monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[str]:
    """Make the program's `verify` command raise `exc`; return argv that runs it."""
    def boom(args: Any) -> dict[str, Any]:
        raise exc

    if program == "edge-kit":
        monkeypatch.setattr("edge_kit.cli.run_command", boom)
    else:
        import device_agent.cli

        monkeypatch.setitem(device_agent.cli.COMMANDS, "verify", boom)
    return ["verify", "some.edgebundle"]


def _one_json_object(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout must hold exactly one JSON object, got {out!r}"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("program", PROGRAMS)
def test_an_unexpected_error_is_exit_1_with_one_json_object(program: str, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = _break_dispatch(program, monkeypatch, ZeroDivisionError("surprise"))
    assert _main(program)([*argv, "--json"]) == EXIT_UNEXPECTED
    out, err = capsys.readouterr()
    assert _one_json_object(out) == {"ok": False, "error": "ZeroDivisionError: surprise", "exit_code": 1}
    assert err.strip().splitlines()[-1].startswith(f"{program}: unexpected error: ZeroDivisionError: surprise")
    assert "Traceback" not in err
    # --debug adds the traceback on stderr, and stdout still holds one object.
    assert _main(program)([*argv, "--json", "--debug"]) == EXIT_UNEXPECTED
    out, err = capsys.readouterr()
    assert _one_json_object(out)["exit_code"] == 1 and "Traceback" in err


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_known_error_keeps_its_exit_code_and_fields(program: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = _break_dispatch(program, monkeypatch, VerificationError("model.onnx", "sha256 mismatch"))
    assert _main(program)([*argv, "--json"]) == EXIT_VERIFICATION
    out, err = capsys.readouterr()
    assert _one_json_object(out) == {"ok": False, "error": "model.onnx: sha256 mismatch", "exit_code": 4,
                                     "member": "model.onnx"}
    assert err.strip() == f"{program}: error: model.onnx: sha256 mismatch"
    # Without --json, stdout stays empty.
    assert _main(program)(argv) == EXIT_VERIFICATION
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("program", PROGRAMS)
def test_bad_usage_is_exit_2_with_one_json_object(program: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(program)(["verify", "--json"]) == EXIT_USAGE  # the bundle argument is missing
    out, err = capsys.readouterr()
    doc = _one_json_object(out)
    assert doc["ok"] is False and doc["exit_code"] == 2 and "bundle" in doc["error"]
    assert "usage:" in err and "Traceback" not in err
    assert _main(program)(["no-such-command", "--json"]) == EXIT_USAGE
    assert _one_json_object(capsys.readouterr().out)["exit_code"] == 2


@pytest.mark.parametrize("program", PROGRAMS)
def test_ctrl_c_is_130_with_one_json_object(program: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = _break_dispatch(program, monkeypatch, KeyboardInterrupt())
    assert _main(program)([*argv, "--json"]) == 130
    out, err = capsys.readouterr()
    assert _one_json_object(out)["exit_code"] == 130 and err.strip() == f"{program}: interrupted"


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_real_process_answers_a_usage_error_in_json(program: str) -> None:
    r = run_cli("edge_kit" if program == "edge-kit" else "device_agent", "verify", "--json", timeout=120)
    assert r.returncode == 2 and _one_json_object(r.stdout)["exit_code"] == 2, r.stderr
