"""The demo's own copy of the digits project: config, DVC repository, signing keys, builds and retraining data.

The demo works in its own folder (default `.edgekit/fleet-demo/`), so it never touches the example's files;
the project config is the example's, with the version and training seed replaced by each retraining.
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
BUILD_TIMEOUT_S = 1800


def write_project(example_config: Path, project: Path) -> Path:
    """Copy the example config into `project` (once) and make `project` a DVC repository; the config path."""
    if not example_config.is_file():
        raise UsageError(f"example config not found: {example_config}")
    project.mkdir(parents=True, exist_ok=True)
    config = project / CONFIG_NAME
    if not config.exists():
        config.write_text(example_config.read_text())
    if not (project / ".dvc").is_dir():
        _run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], project, "dvc init")
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
    result = _run([sys.executable, "-m", "edge_kit", "build", "--config", str(config), "--out", str(out_dir),
                   "--key", str(key), "--json"], config.parent, "edge-kit build", log=log)
    doc: dict[str, Any] = json.loads(result.strip().splitlines()[-1])
    return doc


def config_value(config: Path, section: str, key: str) -> str | None:
    import tomllib

    value = tomllib.loads(config.read_text()).get(section, {}).get(key)
    return None if value is None else str(value)


def set_config_value(config: Path, section: str, key: str, value: str | int) -> None:
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


def _run(cmd: list[str], cwd: Path, what: str, log: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise EdgeKitError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout
