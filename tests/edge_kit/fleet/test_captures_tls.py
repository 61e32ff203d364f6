"""Capture uploads authenticated by the device's enrolled client certificate, against a real `edge-kit fleet
serve` over HTTPS with `--tls-client-ca` (and, in the second server, `--device-key-file` too): the certificate's
device uploads its own records; a batch or an `X-Edgekit-Device` naming another device is 403; no certificate
is 401 (without a device key) or falls back to the device token (with one); the operator exports with the
token and no certificate."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_kit.fleet.device_tokens import create_device_key, device_token
from edge_kit.fleet.identity import FleetCA
from harness.fleetkit import make_bundle
from harness.processes import MosquittoBroker
from tests.edge_kit.fleet.captures_kit import (
    UPLOAD,
    FleetServe,
    batch,
    call,
    device_headers,
    export_all,
    operator,
    record,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[FleetCA, MosquittoBroker]]:
    ca = FleetCA(tmp_path / "ca")
    for name, role, hosts in (("dev1", "device", ()), ("dev2", "device", ()), ("server", "broker", ("127.0.0.1",))):
        issued = ca.issue(name, tmp_path / name, role=role, hosts=hosts)
        issued.cert.rename(tmp_path / name / "cert.pem")
        issued.key.rename(tmp_path / name / "key.pem")
    (tmp_path / "bundles").mkdir()
    (tmp_path / "broker").mkdir()
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    try:
        yield ca, broker
    finally:
        broker.stop()


def _context(tmp: Path, ca: FleetCA, device: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if device is not None:
        context.load_cert_chain(str(tmp / device / "cert.pem"), str(tmp / device / "key.pem"))
    return context


def test_the_client_certificate_is_the_uploading_device(tmp_path: Path,
                                                        pki: tuple[FleetCA, MosquittoBroker]) -> None:
    ca, broker = pki
    bundle = make_bundle(tmp_path / "bundles")
    rng = np.random.default_rng(11)
    tls = ["--tls-certfile", str(tmp_path / "server" / "cert.pem"), "--tls-keyfile",
           str(tmp_path / "server" / "key.pem"), "--tls-client-ca", str(ca.cert_path)]
    server = FleetServe(tmp_path, broker.url, bundle.path.parent, *tls, scheme="https")
    dev1, dev2, nobody = (_context(tmp_path, ca, d) for d in ("dev1", "dev2", None))
    try:
        url = server.url + UPLOAD
        mine = [record(bundle, rng) for _ in range(4)]
        status, body = call(url, "POST", batch("dev1", mine), context=dev1)  # no header needed: the CN says dev1
        assert (status, body["stored"]) == (200, 4)
        assert call(url, "POST", batch("dev1", mine), {"X-Edgekit-Device": "dev1"}, context=dev1)[1][
            "duplicates"] == 4
        theirs = [record(bundle, rng) for _ in range(2)]
        assert call(url, "POST", batch("dev2", theirs), context=dev1)[0] == 403  # dev1 uploading dev2's records
        assert call(url, "POST", batch("dev2", theirs), {"X-Edgekit-Device": "dev2"}, context=dev1)[0] == 403
        assert call(url, "POST", batch("dev1", theirs), context=nobody)[0] == 401  # no certificate, no device key
        assert call(url, "POST", batch("dev1", theirs), operator(), context=nobody)[0] == 401
        assert call(url, "POST", batch("dev2", theirs), context=dev2)[1]["stored"] == 2
        exported = export_all(server.url, context=nobody)  # the operator: token, no certificate
        assert {r["id"]: r["device"] for r in exported} == {**{r["id"]: "dev1" for r in mine},
                                                            **{r["id"]: "dev2" for r in theirs}}
    finally:
        server.stop()

    # With a device key as well, a device without a certificate uploads with its token; one with a
    # certificate is still its certificate's device whatever token it shows.
    key_file = tmp_path / "ca" / "device-token.key"
    key = create_device_key(key_file)
    server = FleetServe(tmp_path, broker.url, bundle.path.parent, *tls, "--device-key-file", str(key_file),
                        scheme="https", name="fleet-key")
    try:
        url = server.url + UPLOAD
        more = [record(bundle, rng) for _ in range(3)]
        status, body = call(url, "POST", batch("dev3", more), device_headers("dev3", device_token(key, "dev3")),
                            context=nobody)
        assert (status, body["stored"]) == (200, 3)
        assert call(url, "POST", batch("dev3", more), device_headers("dev3", "0" * 64), context=nobody)[0] == 401
        assert call(url, "POST", batch("dev3", more), device_headers("dev3", device_token(key, "dev3")),
                    context=dev1)[0] == 403  # dev1's certificate naming dev3
    finally:
        server.stop()
