"""Help pages as a user meets them: every page says what the command is for, and lists the exit codes."""

from __future__ import annotations

import argparse
from importlib import metadata

import pytest

from device_agent.cli_runner import EXIT_CODES, exit_codes_epilog, subcommand_parsers
from device_agent.errors import EXIT_INTERRUPTED
from harness.processes import run_cli

PROGRAMS = ["edge-kit", "edge-agent"]


def _parser(program: str) -> argparse.ArgumentParser:
    if program == "edge-kit":
        from edge_kit.cli import build_parser
    else:
        from device_agent.cli import build_parser
    return build_parser()


def _pages(program: str) -> list[argparse.ArgumentParser]:
    top = _parser(program)
    return [top, *subcommand_parsers(top)]


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_help_page_says_what_the_command_is_for(program: str) -> None:
    pages = _pages(program)
    assert len(pages) > 3  # the walk found the subcommands
    for page in pages:
        assert page.description and len(page.description.split()) >= 8, f"{page.prog}: no description"
        assert page.description.splitlines()[0] in page.format_help()


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_help_page_lists_the_exit_codes(program: str) -> None:
    for page in _pages(program):
        text = page.format_help()
        assert "exit codes:" in text, page.prog
        for code in (0, 1, 2, 130):
            assert f"\n  {code:<4}{EXIT_CODES[code]}" in text, (page.prog, code)


def test_only_edge_kit_lists_the_training_and_gate_codes() -> None:
    assert "\n  75  " in _parser("edge-kit").format_help()
    assert "\n  3   " in _parser("edge-kit").format_help()
    agent = _parser("edge-agent").format_help()
    assert "\n  75  " not in agent and "\n  3   " not in agent


def test_epilog_is_one_line_per_code_in_order() -> None:
    lines = exit_codes_epilog([130, 0, EXIT_INTERRUPTED]).splitlines()
    assert lines[0] == "exit codes:"
    assert [int(line.split()[0]) for line in lines[1:]] == [0, 75, 130]


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_argument_has_help(program: str) -> None:
    for page in _pages(program):
        for action in page._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{page.prog}: {action.dest} has no help"


@pytest.mark.parametrize(("module", "name"), [("device_agent", "edge-agent"), ("edge_kit", "edge-kit")])
def test_version_prints_the_installed_version(module: str, name: str) -> None:
    res = run_cli(module, "--version", timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{name} {metadata.version('edge-kit')}"


def test_top_level_help_says_what_the_tool_is_for_first() -> None:
    res = run_cli("edge_kit", "--help", timeout=60)
    assert res.returncode == 0, res.stderr
    first_paragraph = " ".join(res.stdout.split("\n\n")[1].split())
    assert "parse arguments" not in res.stdout
    assert "edge devices" in first_paragraph and "drift" in first_paragraph
