"""Bundle downloads authenticated by the device's enrolled certificate, against a real `edge-kit fleet serve`
with `--tls-certfile/--tls-keyfile/--tls-client-ca` (and `--tls-crl` after a revocation), fetched by the
agent's own download client: the enrolled device gets the bundle, no certificate is 401, another CA's
certificate fails the handshake, a certificate claiming another device is 403, a revoked device is refused
once the fleet restarts with the CRL; the operator still uses the API with the token and no certificate."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_agent.deploy.config import DeploySettings
from device_agent.deploy.download import DownloadFailed, DownloadPolicy, DownloadStats, download, file_sha256
from device_agent.deploy.updater import download_policy
from device_agent.settings import MqttSettings
from edge_kit.fleet.identity import FleetCA
from harness.fleetkit import OPERATOR_TOKEN, DigitsBundle, make_bundle
from harness.processes import MosquittoBroker, cli_env, free_port, run_cli, wait_for_port
from tests.helpers.mqtt import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "tlsdl"


@dataclass(frozen=True)
class Identity:
    ca: Path
    cert: Path
    key: Path


@dataclass
class Setup:
    tmp: Path
    ca: FleetCA
    ids: dict[str, Identity]
    bundle: DigitsBundle
    broker: MosquittoBroker
    token: Path
    port: int

    @property
    def sha256(self) -> str:
        return file_sha256(self.bundle.path)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/api/bundles/{self.sha256}"


class FleetServe:
    """A real `edge-kit fleet serve` over HTTPS in its own process group."""

    def __init__(self, s: Setup, *extra: str) -> None:
        server = s.ids["server"]
        argv = [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", s.broker.url,
                "--db", f"sqlite:///{s.tmp}/fleet.db", "--http", f"127.0.0.1:{s.port}", "--fleet", FLEET,
                "--bundles", str(s.bundle.path.parent), "--token-file", str(s.token),
                "--tls-certfile", str(server.cert), "--tls-keyfile", str(server.key),
                "--tls-client-ca", str(s.ca.cert_path), *extra]
        self.log = s.tmp / "fleet.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=cli_env(), stdout=out, stderr=out, start_new_session=True)
        try:
            wait_for_port(s.port, timeout=120)
        except Exception:
            self.stop()
            raise AssertionError(self.log.read_text(errors="replace")[-3000:]) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A fleet CA with dev1 (through the real CLI), dev2 and the server's certificate for 127.0.0.1; a bundle."""
    ca = FleetCA(tmp_path / "ca")
    out = run_cli("edge_kit", "fleet", "enroll", "dev1", "--ca", str(ca.folder), "--out", str(tmp_path / "dev1"),
                  "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    ids = {"dev1": Identity(tmp_path / "dev1" / "ca.pem", tmp_path / "dev1" / "dev1.pem",
                            tmp_path / "dev1" / "dev1.key")}
    for name, role, hosts in (("dev2", "device", ()), ("server", "broker", ("127.0.0.1",))):
        issued = ca.issue(name, tmp_path / name, role=role, hosts=hosts)
        ids[name] = Identity(issued.ca, issued.cert, issued.key)
    # Another CA minting dev1's name: its certificate names dev1 but proves nothing to this fleet.
    forged = FleetCA(tmp_path / "other-ca").issue("dev1", tmp_path / "forged")
    ids["forged"] = Identity(forged.ca, forged.cert, forged.key)
    folder = tmp_path / "bundles"
    folder.mkdir()
    bundle = make_bundle(folder, version="1.0.0")
    token = tmp_path / "token"
    token.write_text(OPERATOR_TOKEN + "\n")
    (tmp_path / "broker").mkdir()
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    try:
        yield Setup(tmp_path, ca, ids, bundle, broker, token, free_port())
    finally:
        broker.stop()


def _policy(s: Setup, identity: str | None) -> DownloadPolicy:
    """The agent's policy: `[deploy]` left at its defaults, the TLS identity taken from `[mqtt]`."""
    i = s.ids[identity] if identity else None
    mqtt = MqttSettings(ca_certs=s.ca.cert_path, certfile=i.cert if i else None, keyfile=i.key if i else None)
    policy = download_policy(DeploySettings(), mqtt)
    # Short waits: a refused handshake is retried (it looks like a dropped link) until this gives up.
    return DownloadPolicy(timeout=20, give_up_after=3.0, backoff_min=0.2, backoff_max=1.0, ca_file=policy.ca_file,
                          also_trust=policy.also_trust, certfile=policy.certfile, keyfile=policy.keyfile)


def _fetch(s: Setup, identity: str | None, device_id: str, staging: str, stats: DownloadStats | None = None) -> Path:
    size = s.bundle.path.stat().st_size
    return download(s.url, sha256=s.sha256, size=size, staging=s.tmp / staging, device_id=device_id,
                    max_bytes=size, policy=_policy(s, identity), stats=stats)


def _operator_get(s: Setup, path: str, token: str | None) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(s.ca.cert_path))  # no client certificate
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"https://127.0.0.1:{s.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _operator_post(s: Setup, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(s.ca.cert_path))
    request = urllib.request.Request(f"https://127.0.0.1:{s.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {OPERATOR_TOKEN}",
                                              "Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _device_get(s: Setup, identity: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One plain GET of the bundle with a device's certificate (no retries, unlike the agent's client)."""
    i = s.ids[identity]
    context = ssl.create_default_context(cafile=str(s.ca.cert_path))
    context.load_cert_chain(str(i.cert), str(i.key))
    try:
        with urllib.request.urlopen(urllib.request.Request(s.url, headers=headers or {}), timeout=30,
                                    context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_downloads_need_the_devices_enrolled_certificate(setup: Setup) -> None:
    s = setup
    server = FleetServe(s)
    try:
        got = _fetch(s, "dev1", "dev1", "staging-dev1")
        assert file_sha256(got) == s.sha256
        assert got.read_bytes() == s.bundle.path.read_bytes()

        # No client certificate: TLS is fine, the download route is not (401, permanent: no retry helps).
        with pytest.raises(DownloadFailed) as refused:
            _fetch(s, None, "dev1", "staging-none")
        assert refused.value.permanent and "401" in str(refused.value)

        # dev1's certificate claiming to be dev2 (whose byte cap it would spend): 403.
        with pytest.raises(DownloadFailed) as claimed:
            _fetch(s, "dev1", "dev2", "staging-claim")
        assert claimed.value.permanent and "403" in str(claimed.value)

        # A certificate from another CA: the handshake fails, so no HTTP answer and no byte of the bundle.
        stats = DownloadStats()
        with pytest.raises(DownloadFailed) as forged:
            _fetch(s, "forged", "dev1", "staging-forged", stats)
        assert not forged.value.permanent and "cannot fetch" in str(forged.value)
        assert stats.received == 0 and stats.requests >= 1
        assert not (s.tmp / "staging-forged" / f"{s.sha256}.bundle").exists()

        # The operator reaches the API over the same TLS listener with the token and no certificate.
        code, body = _operator_get(s, "/api/deployments", OPERATOR_TOKEN)
        assert code == 200 and body == {"deployments": []}
        code, body = _operator_get(s, "/api/deployments", None)
        assert code == 401 and "operator token" in body["error"]
    finally:
        server.stop()

    # Revoke dev1; once the fleet restarts with the CA's CRL, dev1 cannot fetch and dev2 still can.
    out = run_cli("edge_kit", "fleet", "revoke", "dev1", "--ca", str(s.ca.folder), "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    server = FleetServe(s, "--tls-crl", str(s.ca.crl_path))
    try:
        stats = DownloadStats()
        with pytest.raises(DownloadFailed) as revoked:
            _fetch(s, "dev1", "dev1", "staging-revoked", stats)
        assert not revoked.value.permanent and stats.received == 0
        assert file_sha256(_fetch(s, "dev2", "dev2", "staging-dev2")) == s.sha256
    finally:
        server.stop()


def test_the_byte_cap_counts_the_certificates_device(setup: Setup) -> None:
    s = setup
    size = s.bundle.path.stat().st_size
    server = FleetServe(s, "--download-cap", "1")
    try:
        code, dep = _operator_post(s, "/api/deployments", {"bundle_path": s.bundle.path.name,
                                                           "devices": ["dev1", "dev2"], "canary": 2})
        assert code == 201, dep
        assert dep["url"] == s.url  # the default public URL follows the listener: https
        # dev1 sends no device header at all: its certificate names it, and its bytes count against dev1.
        code, body = _device_get(s, "dev1")
        assert code == 200 and len(body) == size

        def served() -> dict[str, int]:
            view = _operator_get(s, f"/api/deployments/{dep['deployment']}", OPERATOR_TOKEN)[1]
            return {d: v["served_bytes"] for d, v in view["devices"].items()}

        wait_until(lambda: served()["dev1"] == size, 30, "dev1's bytes counted")
        code, body = _device_get(s, "dev1")
        assert code == 429 and b"dev1" in body  # cap 1 x the size, spent
        code, _ = _device_get(s, "dev1", {"X-Edgekit-Device": "dev2"})
        assert code == 403  # nor can it spend dev2's allowance under dev2's name
        code, body = _device_get(s, "dev2", {"X-Edgekit-Device": "dev2"})
        assert code == 200 and len(body) == size
        wait_until(lambda: served() == {"dev1": size, "dev2": size}, 30, "dev2's bytes counted")
    finally:
        server.stop()


def test_fleet_serve_refuses_tls_flags_that_do_not_fit(setup: Setup) -> None:
    s = setup
    base = ["fleet", "serve", "--broker", s.broker.url, "--db", f"sqlite:///{s.tmp}/bad.db",
            "--http", f"127.0.0.1:{s.port}", "--bundles", str(s.bundle.path.parent), "--json"]
    server = s.ids["server"]
    cases = [
        (["--tls-client-ca", str(s.ca.cert_path)], "needs --tls-certfile"),
        (["--tls-certfile", str(server.cert), "--tls-keyfile", str(server.key), "--tls-crl", str(s.ca.crl_path)],
         "--tls-crl needs --tls-client-ca"),
        (["--tls-certfile", str(s.tmp / "missing.pem")], "file not found"),
        (["--tls-certfile", str(server.cert), "--tls-keyfile", str(s.ids["dev2"].key)], "cannot use these files"),
    ]
    for extra, words in cases:
        r = run_cli("edge_kit", *base, *extra, timeout=120)
        assert r.returncode == 2 and words in r.json()["error"], (extra, r.stdout, r.stderr)
    assert not (s.tmp / "bad.db").exists()  # refused before the database was created


def test_the_download_identity_falls_back_to_the_mqtt_one(tmp_path: Path) -> None:
    own, mqtt_files = tmp_path / "own", tmp_path / "mqtt"
    mqtt = MqttSettings(ca_certs=mqtt_files / "ca.pem", certfile=mqtt_files / "d.pem", keyfile=mqtt_files / "d.key")
    inherited = download_policy(DeploySettings(), mqtt)
    assert (inherited.ca_file, inherited.also_trust) == (None, str(mqtt_files / "ca.pem"))
    assert (inherited.certfile, inherited.keyfile) == (str(mqtt_files / "d.pem"), str(mqtt_files / "d.key"))
    named = download_policy(DeploySettings(ca_certs=own / "ca.pem", certfile=own / "d.pem", keyfile=own / "d.key"),
                            mqtt)
    assert (named.ca_file, named.also_trust) == (str(own / "ca.pem"), None)  # its CA replaces the system's
    assert (named.certfile, named.keyfile) == (str(own / "d.pem"), str(own / "d.key"))
    assert download_policy(DeploySettings()).certfile is None
