"""`edge-kit fleet enroll` gives a device its upload token for the capture routes (docs/captures.md)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from edge_kit.cli import main
from edge_kit.fleet.device_tokens import load_device_key, token_matches
from edge_kit.fleet.identity import FleetCA


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_device_enrollment_writes_an_upload_token_from_one_fleet_key(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    assert main(["fleet", "enroll", "cam-1", "--ca", str(ca_dir), "--out", str(tmp_path / "cam-1"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    token_file = Path(doc["upload_token"])
    assert token_file == tmp_path / "cam-1" / "upload.token" and _mode(token_file) == 0o600
    key_file = ca_dir / "device-token.key"
    assert Path(doc["device_key"]) == key_file and _mode(key_file) == 0o600
    key = load_device_key(key_file)
    token = token_file.read_text()
    assert token_matches(key, "cam-1", token) and not token_matches(key, "cam-2", token)

    # A second device: the same key (made once), its own token.
    second = FleetCA(ca_dir).issue("cam-2", tmp_path / "cam-2")
    assert load_device_key(key_file) == key
    assert second.upload_token is not None
    other = second.upload_token.read_text()
    assert token_matches(key, "cam-2", other) and other.strip() != token.strip()

    # Re-enrolling (--force) keeps the token valid: it depends on the id and the fleet key only.
    again = FleetCA(ca_dir).issue("cam-1", tmp_path / "cam-1", force=True)
    assert again.upload_token is not None and again.upload_token.read_text() == token


def test_service_and_broker_get_no_upload_token(tmp_path: Path) -> None:
    ca = FleetCA(tmp_path / "ca")
    assert ca.issue("", tmp_path / "svc", role="service").upload_token is None
    assert ca.issue("", tmp_path / "broker", role="broker", hosts=("127.0.0.1",)).upload_token is None
    assert not (tmp_path / "svc" / "upload.token").exists()
    assert not (tmp_path / "ca" / "device-token.key").exists()
