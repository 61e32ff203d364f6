"""The demo's own copy of the digits project: config, git + DVC repository, signing keys, builds.

The demo works in its own folder (default `.edgekit/fleet-demo/`), so it never touches the example's files;
the project config is the example's, with the version and training seed replaced by each retraining, and
the field data each retraining adds committed to the project's own git repository (`edge-kit data add`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from device_agent.bundle.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_keypair
from edge_kit.demo.processes import child_env
from edge_kit.errors import EdgeKitError, UsageError

CONFIG_NAME = "edgekit.toml"
DEMO_TEST_FRACTION = 0.4
BUILD_TIMEOUT_S = 1800


# What builds and exports leave in the project that is not source: kept out of its commits.
GITIGNORE = "/dist/\n/field-export/\n/retrain.log\n/mlruns/\n"


def write_project(example_config: Path, project: Path) -> Path:
    """Copy the example config into `project` (once) and make `project` a git + DVC repository with the config
    committed; the config path."""
    if not example_config.is_file():
        raise UsageError(f"example config not found: {example_config}")
    project.mkdir(parents=True, exist_ok=True)
    config = project / CONFIG_NAME
    if not config.exists():
        config.write_text(example_config.read_text())
        # Twice the example's held-out share: the feeders need two disjoint pools of held-out digits (one
        # fed, and captured, under the first version, one to score the retrained version on), each about as
        # large as the example's whole test split, so a pool repeats its images no more often than that did.
        set_config_value(config, "data", "test_fraction", DEMO_TEST_FRACTION)
    if not (project / ".git").is_dir():
        run_command(["git", "init", "-q"], project, "git init")
        for key, value in (("user.name", "edge-kit fleet demo"), ("user.email", "fleet-demo@localhost")):
            run_command(["git", "config", key, value], project, "git config")
        (project / ".gitignore").write_text(GITIGNORE)
    if not (project / ".dvc").is_dir():
        run_command([sys.executable, "-m", "dvc", "init", "-q"], project, "dvc init")
    # The data snapshot and its DVC record, so the first commit holds what the first build trains on.
    run_command([sys.executable, "-m", "edge_kit", "data", "snapshot", "--config", str(config), "--json"], project,
                "edge-kit data snapshot")
    run_command(["git", "add", "-A"], project, "git add")
    if run_command(["git", "status", "--porcelain"], project, "git status").strip():
        run_command(["git", "commit", "-q", "-m", "the demo project"], project, "git commit")
    return config


def ensure_keys(candidates: list[Path], fallback: Path) -> tuple[Path, Path]:
    """(private, public) key paths: the first folder that has a pair (e.g. `make demo`'s .keys), else a new pair."""
    for folder in candidates:
        if (folder / PRIVATE_KEY_NAME).is_file() and (folder / PUBLIC_KEY_NAME).is_file():
            return folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if (fallback / PRIVATE_KEY_NAME).is_file():
        return fallback / PRIVATE_KEY_NAME, fallback / PUBLIC_KEY_NAME
    return generate_keypair(fallback)


def build_bundle(config: Path, out_dir: Path, key: Path, log: Path) -> dict[str, Any]:
    """`edge-kit build` (the real pipeline: train or reuse, quantize, gate, sign); its --json result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_command([sys.executable, "-m", "edge_kit", "build", "--config", str(config), "--out", str(out_dir),
                   "--key", str(key), "--json"], config.parent, "edge-kit build", log=log)
    doc: dict[str, Any] = json.loads(result.strip().splitlines()[-1])
    return doc


def config_value(config: Path, section: str, key: str) -> str | None:
    import tomllib

    value = tomllib.loads(config.read_text()).get(section, {}).get(key)
    return None if value is None else str(value)


def set_config_value(config: Path, section: str, key: str, value: str | int | float) -> None:
    """Replace the value of `key` inside `[section]` of the config text (keeps the user's comments and layout)."""
    text = config.read_text()
    literal = json.dumps(value)  # a TOML basic string or integer is written the same way
    pattern = re.compile(rf"(\[{re.escape(section)}\][^\[]*?^{re.escape(key)}\s*=\s*)(\"[^\"]*\"|[^\s#]+)", re.M | re.S)
    new, count = pattern.subn(lambda m: f"{m.group(1)}{literal}", text, count=1)
    if count != 1:
        raise UsageError(f"{config}: cannot find {section}.{key} to update")
    config.write_text(new)


def next_version(version: str) -> str:
    parts = version.split(".")
    if not parts[-1].isdigit():
        raise UsageError(f"cannot bump version {version!r}: the last part must be a number")
    return ".".join([*parts[:-1], str(int(parts[-1]) + 1)])


def run_command(cmd: list[str], cwd: Path, what: str, log: Path | None = None) -> str:
    """Run `cmd` in `cwd`; its stdout. EdgeKitError with the tail of its stderr when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise EdgeKitError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout
