"""`[capture]`: defaults, the rule of each key, and `check_capture` (enabled needs an http(s) upload_url and a
device credential whose files exist), each refusal a ConfigError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.capture.config import CaptureSettings, check_capture, tls_files
from device_agent.errors import ConfigError
from device_agent.settings import load_settings


def write(tmp_path: Path, capture: str, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"[capture]\n{capture}\n{extra}")
    return path


def test_defaults_are_off_and_documented_values() -> None:
    c = CaptureSettings()
    assert (c.enabled, c.fraction, c.bytes_per_day, c.fleet_requests, c.max_requested) == (False, 0.01, 10 << 20,
                                                                                           False, 1000)
    assert (c.spool_bytes, c.batch_records, c.batch_bytes, c.upload_interval) == (64 << 20, 64, 1 << 20, 10.0)
    check_capture(c)  # off: nothing to check


def test_state_dir_defaults_like_deploys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert CaptureSettings().state_path() == Path("edge-agent-capture")
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}:/other")
    assert CaptureSettings().state_path() == tmp_path / "capture"


def test_a_config_file_sets_the_section_with_paths_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "upload.token").write_text("abc123\n")
    settings = load_settings(write(tmp_path, 'enabled = true\nupload_url = "http://127.0.0.1:8080"\n'
                                             'token_file = "upload.token"\nfraction = 0.5\nstate_dir = "cap"'))
    assert settings.capture.enabled and settings.capture.fraction == 0.5
    assert settings.capture.token_file == tmp_path / "upload.token"
    assert settings.capture.state_path() == tmp_path / "cap"
    check_capture(settings.capture, deploy=settings.deploy, mqtt=settings.mqtt)


@pytest.mark.parametrize(("line", "key"), [
    ("fraction = 1.5", "capture.fraction"),
    ("fraction = -0.1", "capture.fraction"),
    ("bytes_per_day = -1", "capture.bytes_per_day"),
    ("batch_records = 1001", "capture.batch_records"),
    ("batch_records = 0", "capture.batch_records"),
    ("spool_bytes = 10", "capture.spool_bytes"),
    ("upload_interval = 0", "capture.upload_interval"),
    ('upload_url = "ftp://fleet"', "capture.upload_url"),
    ('upload_url = "https://user:pw@fleet"', "capture.upload_url"),
    ('upload_url = "http://fleet:99999"', "capture.upload_url"),
    ('upload_url = "fleet:8080"', "capture.upload_url"),
    ("colour = 1", "capture.colour"),
    ('enabled = "yes"', "capture.enabled"),
])
def test_each_key_keeps_its_rule(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, line))
    assert info.value.key == key


def enabled(tmp_path: Path, **changes: object) -> CaptureSettings:
    base: dict[str, object] = {"enabled": True, "upload_url": "http://127.0.0.1:1"}
    return CaptureSettings(**{**base, **changes})  # type: ignore[arg-type]


def test_enabled_needs_an_upload_url_and_a_credential(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("abc\n")
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    cases: list[tuple[CaptureSettings, str, str]] = [
        (enabled(tmp_path, upload_url=None, token_file=token), "capture.enabled", "upload_url"),
        (enabled(tmp_path), "capture.enabled", "credential"),
        (enabled(tmp_path, token_file=tmp_path / "missing"), "capture.token_file", "not found"),
        (enabled(tmp_path, certfile=cert), "capture.enabled", "https"),  # a certificate over http:// is no use
        (enabled(tmp_path, token_file=token, keyfile=cert), "capture.keyfile", "certfile"),
        (enabled(tmp_path, token_file=token, ca_certs=tmp_path / "nope.pem"), "capture.ca_certs", "not found"),
    ]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases.append((enabled(tmp_path, token_file=empty), "capture.token_file", "one token"))
    for settings, key, words in cases:
        with pytest.raises(ConfigError) as info:
            check_capture(settings)
        assert info.value.key == key and words in str(info.value), (settings, str(info.value))
    check_capture(enabled(tmp_path, token_file=token))
    check_capture(enabled(tmp_path, upload_url="https://fleet:8443", certfile=cert))


class Tls:
    def __init__(self, ca: str | None, cert: str | None, key: str | None) -> None:
        self.ca_certs, self.certfile, self.keyfile = (None if p is None else Path(p) for p in (ca, cert, key))


def test_the_tls_identity_falls_back_to_deploy_then_mqtt(tmp_path: Path) -> None:
    deploy, mqtt = Tls("d-ca", "d-cert", "d-key"), Tls("m-ca", "m-cert", "m-key")
    own = tls_files(CaptureSettings(certfile=Path("c-cert"), keyfile=Path("c-key"), ca_certs=Path("c-ca")),
                    deploy, mqtt)
    assert (own.certfile, own.keyfile, own.ca_file, own.also_trust) == (Path("c-cert"), Path("c-key"),
                                                                        Path("c-ca"), None)
    from_deploy = tls_files(CaptureSettings(), deploy, mqtt)
    assert (from_deploy.certfile, from_deploy.ca_file, from_deploy.also_trust) == (Path("d-cert"), Path("d-ca"), None)
    from_mqtt = tls_files(CaptureSettings(), Tls(None, None, None), mqtt)
    assert (from_mqtt.certfile, from_mqtt.keyfile, from_mqtt.ca_file, from_mqtt.also_trust) == (
        Path("m-cert"), Path("m-key"), None, Path("m-ca"))
    # the mqtt certificate counts as the credential over https
    cert = tmp_path / "m.pem"
    cert.write_text("x")
    check_capture(enabled(tmp_path, upload_url="https://fleet"), mqtt=Tls(None, str(cert), None))
