"""`edge-kit keygen` key files: 0600 in a 0700 folder, replaced (never reused or followed) by --force."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from device_agent.bundle.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, generate_keypair, load_private_key
from device_agent.errors import UsageError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_new_key_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    assert mode(private) == 0o600 and mode(tmp_path / "keys") == 0o700
    assert mode(public) == 0o644
    load_private_key(private)


def test_force_replaces_a_world_readable_key_file_with_a_0600_one(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    keys.chmod(0o755)
    (keys / PRIVATE_KEY_NAME).write_bytes(b"old")
    (keys / PRIVATE_KEY_NAME).chmod(0o644)
    with pytest.raises(UsageError):
        generate_keypair(keys)
    private, _ = generate_keypair(keys, force=True)
    assert mode(private) == 0o600 and mode(keys) == 0o700
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize("name", [PRIVATE_KEY_NAME, PUBLIC_KEY_NAME])
def test_force_never_follows_a_symlink_planted_at_the_key_path(tmp_path: Path, name: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    victim.chmod(0o644)
    (keys / name).symlink_to(victim)
    generate_keypair(keys, force=True)
    assert victim.read_bytes() == b"do not touch" and mode(victim) == 0o644
    assert not (keys / name).is_symlink()
    assert not [p for p in keys.iterdir() if p.name.endswith(".tmp")]


def test_a_dangling_symlink_counts_as_an_existing_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / PRIVATE_KEY_NAME).symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError):
        generate_keypair(keys)
    assert not (tmp_path / "nowhere").exists()


def test_the_cli_reports_the_keys(edge_kit_cli, tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "k" / PRIVATE_KEY_NAME)
    res = edge_kit_cli("keygen", "--out", str(tmp_path / "k"), "--force", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "elsewhere").exists()
    assert mode(Path(res.json()["private_key"])) == 0o600
