"""`edge-kit fleet enroll` / `revoke`: the fleet CA, one certificate per device id, the revocation list."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_kit.errors import UsageError
from edge_kit.fleet.identity import SERVICE_IDENTITY, FleetCA, identity_of


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enroll_makes_the_ca_once_and_a_certificate_per_device(tmp_path: Path) -> None:
    ca = FleetCA(tmp_path / "ca")
    first = ca.issue("cam-7", tmp_path / "cam-7", days=30)
    assert first.ca_created
    assert _mode(ca.folder) == 0o700 and _mode(ca.folder / "ca.key") == 0o600 and _mode(first.key) == 0o600
    root = _cert(ca.cert_path)
    cert = _cert(first.cert)
    cert.verify_directly_issued_by(root)  # raises if the CA did not sign it
    assert identity_of(first.cert) == "cam-7" == cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    assert first.ca.read_bytes() == ca.cert_path.read_bytes()  # the device gets the CA to check the broker

    second = ca.issue("cam-8", tmp_path / "cam-8")
    assert not second.ca_created and _cert(ca.cert_path) == root  # the same CA signs every device
    _cert(second.cert).verify_directly_issued_by(root)
    assert [r["identity"] for r in ca.issued()] == ["cam-7", "cam-8"]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(root.public_key()) and len(crl) == 0  # present from the start, empty


def test_service_and_broker_identities(tmp_path: Path) -> None:
    ca = FleetCA(tmp_path / "ca")
    service = ca.issue("ignored", tmp_path / "svc", role="service")
    assert identity_of(service.cert) == SERVICE_IDENTITY
    broker = ca.issue("", tmp_path / "broker", role="broker", hosts=("127.0.0.1", "mqtt.example.net"))
    cert = _cert(broker.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == ["127.0.0.1", "mqtt.example.net"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(UsageError, match="--host"):
        ca.issue("", tmp_path / "b2", role="broker")


@pytest.mark.parametrize("bad", ["", " ", "a/b", "dev+", "dev#", "nul\x00", "esc\x1b[31m", "x" * 129, "..",
                                 SERVICE_IDENTITY])
def test_a_device_id_that_cannot_be_one_topic_level_is_refused(tmp_path: Path, bad: str) -> None:
    ca = FleetCA(tmp_path / "ca")
    with pytest.raises(UsageError, match="device id"):
        ca.issue(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_revoke_lists_every_certificate_of_the_id_in_the_crl(tmp_path: Path) -> None:
    ca = FleetCA(tmp_path / "ca")
    old = ca.issue("cam-7", tmp_path / "a")
    new = ca.issue("cam-7", tmp_path / "b")
    keep = ca.issue("cam-8", tmp_path / "c")
    assert sorted(ca.revoke("cam-7")) == sorted([f"{old.serial:x}", f"{new.serial:x}"])
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(_cert(ca.cert_path).public_key())
    assert {r.serial_number for r in crl} == {old.serial, new.serial}
    assert crl.get_revoked_certificate_by_serial_number(keep.serial) is None
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    with pytest.raises(UsageError, match="already revoked"):
        ca.revoke("cam-7")
    with pytest.raises(UsageError, match="no certificate was issued"):
        ca.revoke("cam-9")
    with pytest.raises(UsageError, match="no CA there"):
        FleetCA(tmp_path / "empty").revoke("cam-7")


def test_the_cli_enrolls_and_revokes_with_clear_errors(tmp_path: Path, edge_kit_cli) -> None:
    ca_dir = tmp_path / "ca"
    out = edge_kit_cli("fleet", "enroll", "cam-7", "--ca", str(ca_dir), "--days", "10", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    info = out.json()
    assert info["ok"] is True and info["identity"] == "cam-7" and info["ca_created"] is True
    assert Path(info["cert"]).parent == ca_dir / "issued" / "cam-7" and identity_of(info["cert"]) == "cam-7"
    again = edge_kit_cli("fleet", "enroll", "cam-7", "--ca", str(ca_dir), timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    bad = edge_kit_cli("fleet", "enroll", "a/b", "--ca", str(ca_dir), "--json", timeout=120)
    assert bad.returncode == 2 and "device id" in bad.json()["error"]
    revoked = edge_kit_cli("fleet", "revoke", "cam-7", "--ca", str(ca_dir), "--json", timeout=120)
    assert revoked.returncode == 0 and revoked.json()["revoked_serials"] == [info["serial"]]
    unknown = edge_kit_cli("fleet", "revoke", "nobody", "--ca", str(ca_dir), timeout=120)
    assert unknown.returncode == 2 and "no certificate was issued" in unknown.stderr
