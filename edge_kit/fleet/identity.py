"""The fleet's certificate authority: one identity per device, and revocation.

`edge-kit fleet enroll` keeps a CA in a folder the operator owns (0700):

    ca.key     the CA's private key (EC P-256, 0600): whoever holds it can mint devices
    ca.pem     the CA certificate: the broker's `cafile` and every client's `ca_certs`
    crl.pem    the revocation list the broker reads (`crlfile`); always present, empty at first
    issued.json  every certificate issued: serial, identity, role, expiry, revocation time
    device-token.key  the key of the devices' upload tokens (0600; made at the first device enrollment):
               `fleet serve --device-key-file` names it (docs/captures.md)

A device certificate's subject common name is the device id, which Mosquitto turns into the MQTT
username (`use_identity_as_username true`); the broker's ACL (deploy/mosquitto.acl) then lets that
username publish only under its own topics. The fleet service gets a fixed identity holding a '/',
which no device id may contain, so no device can be enrolled as the service.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.atomic import atomic_write_bytes
from device_agent.uplink.wire import topic_level_problem
from edge_kit.errors import UsageError
from edge_kit.fleet.device_tokens import create_device_key, device_token

CA_KEY, CA_CERT, CRL, ISSUED = "ca.key", "ca.pem", "crl.pem", "issued.json"
DEVICE_TOKEN_KEY = "device-token.key"  # in the CA folder: the key every device's upload token is derived from
UPLOAD_TOKEN = "upload.token"  # beside a device's key and certificate: its credential for the capture routes
# The fleet service's MQTT username: a '/' cannot appear in a device id (an MQTT topic level), so
# enrolling a device can never produce this identity.
SERVICE_IDENTITY = "edgekit-fleet/service"
ROLES = ("device", "service", "broker")
CA_DAYS = 3650
DEFAULT_DAYS = 365
MAX_DAYS = 3650


@dataclass(frozen=True)
class Issued:
    """What `enroll` wrote: the identity, its files and the certificate's serial and expiry."""

    identity: str
    role: str
    key: Path
    cert: Path
    ca: Path
    serial: int
    not_after: str
    ca_created: bool
    upload_token: Path | None = None  # role device only

    def describe(self) -> dict[str, Any]:
        return {"identity": self.identity, "role": self.role, "key": str(self.key), "cert": str(self.cert),
                "ca": str(self.ca), "serial": f"{self.serial:x}", "not_after": self.not_after,
                "ca_created": self.ca_created,
                "upload_token": str(self.upload_token) if self.upload_token else None}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_days(days: int, what: str) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise UsageError(f"{what} must be between 1 and {MAX_DAYS} days, got {days}")


class FleetCA:
    """A CA folder: creates it when absent, issues and revokes certificates, keeps the CRL current."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def cert_path(self) -> Path:
        return self.folder / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.folder / CRL

    @property
    def device_key_path(self) -> Path:
        """The key of the devices' upload tokens (`fleet serve --device-key-file`)."""
        return self.folder / DEVICE_TOKEN_KEY

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: two enrolments must not both create the CA or lose a serial."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.folder.stat().st_mode & 0o077:
            self.folder.chmod(0o700)
        with (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return (self.folder / CA_KEY).is_file() and self.cert_path.is_file()

    def _create(self, name: str, days: int) -> None:
        if (self.folder / CA_KEY).exists() or self.cert_path.exists():
            raise UsageError(f"{self.folder} holds part of a CA ({CA_KEY} or {CA_CERT} is missing)",
                             hint="restore the missing file or use another --ca folder")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        atomic_write_bytes(self.folder / CA_KEY, _key_pem(key), mode=0o600)
        atomic_write_bytes(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        self._write_issued([])
        self._write_crl(key, cert, [])

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key((self.folder / CA_KEY).read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--ca {self.folder}: cannot read the CA: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UsageError(f"--ca {self.folder}: {CA_KEY} is not an EC key made by `edge-kit fleet enroll`")
        return key, cert

    def _issued(self) -> list[dict[str, Any]]:
        path = self.folder / ISSUED
        if not path.exists():
            return []
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--ca {self.folder}: {ISSUED} is unreadable: {exc}") from exc
        return list(records)

    def _write_issued(self, records: list[dict[str, Any]]) -> None:
        atomic_write_bytes(self.folder / ISSUED, (json.dumps(records, indent=1) + "\n").encode(), mode=0o600)

    def _write_crl(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                   records: list[dict[str, Any]]) -> None:
        """The CRL the broker reads. Its next update is the CA's own expiry: an expired CRL makes OpenSSL
        refuse every client, and this file is read locally by the broker, not fetched by anyone."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(cert.subject)
                   .last_update(now - dt.timedelta(minutes=5)).next_update(cert.not_valid_after_utc))
        for r in records:
            if r.get("revoked_at"):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(r["serial"], 16))
                    .revocation_date(dt.datetime.fromisoformat(r["revoked_at"])).build())
        crl = builder.sign(key, hashes.SHA256())
        atomic_write_bytes(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)

    def ensure(self, name: str = "edge-kit fleet CA", days: int = CA_DAYS) -> bool:
        """Create the CA if the folder has none; True when it was created."""
        _check_days(days, "--ca-days")
        with self._locked():
            if self.exists():
                return False
            self._create(name, days)
            return True

    def issue(self, identity: str, out_dir: str | Path, *, role: str = "device", days: int = DEFAULT_DAYS,
              hosts: tuple[str, ...] = (), force: bool = False) -> Issued:
        """A new key and certificate for `identity`, signed by the CA (created first if absent).

        role "device": CN = the device id (validated as one MQTT topic level), client authentication;
            also its upload token (`upload.token`, 0600, beside the key), derived from the CA folder's
            `device-token.key`, which the first device enrollment creates.
        role "service": CN = SERVICE_IDENTITY, client authentication (`identity` is ignored).
        role "broker": CN = the first host, subjectAltName = every host, server authentication.
        """
        if role not in ROLES:
            raise UsageError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        _check_days(days, "--days")
        if role == "device":
            problem = topic_level_problem(identity)
            if problem is None and not identity.isprintable():
                problem = f"{identity!r} holds control characters"
            if problem is None and identity in (".", ".."):
                problem = f"{identity!r} would name a folder, not a file"
            if problem is None and len(identity) > 128:
                problem = "is longer than 128 characters (the fleet refuses longer device ids)"
            if problem:
                raise UsageError(f"device id {problem}")
        elif role == "service":
            identity = SERVICE_IDENTITY
        else:
            if not hosts:
                raise UsageError("--role broker needs --host NAME (the name or address clients connect to)")
            identity = hosts[0]
        created = self.ensure()
        out = Path(out_dir)
        stem = identity.replace("/", "_")
        key_path, cert_path, ca_copy = out / f"{stem}.key", out / f"{stem}.pem", out / CA_CERT
        if not force and (key_path.exists() or cert_path.exists()):
            raise UsageError(f"{key_path} or {cert_path} already exists", hint="pass --force to issue a new one")
        with self._locked():
            ca_key, ca_cert = self._load()
            now = _now()
            not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
            key = ec.generate_private_key(ec.SECP256R1())
            serial = x509.random_serial_number()
            usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = (x509.CertificateBuilder().subject_name(_name(identity)).issuer_name(ca_cert.subject)
                       .public_key(key.public_key()).serial_number(serial)
                       .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
                       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                      critical=False))
            if role == "broker":
                builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
            atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
            atomic_write_bytes(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
            token_path = None
            if role == "device":
                token_path = out / UPLOAD_TOKEN
                token = device_token(create_device_key(self.device_key_path), identity)
                atomic_write_bytes(token_path, (token + "\n").encode(), mode=0o600)
            records = self._issued()
            records.append({"serial": f"{serial:x}", "identity": identity, "role": role,
                            "not_after": not_after.isoformat(), "issued_at": now.isoformat(), "revoked_at": None})
            self._write_issued(records)
        return Issued(identity, role, key_path, cert_path, ca_copy, serial, not_after.isoformat(), created,
                      token_path)

    def revoke(self, identity: str) -> list[str]:
        """Revoke every unrevoked certificate issued to `identity`; rewrites the CRL. Returns the serials."""
        if not self.exists():
            raise UsageError(f"--ca {self.folder}: no CA there (enroll a device first)")
        with self._locked():
            ca_key, ca_cert = self._load()
            records = self._issued()
            now = _now().isoformat()
            revoked = []
            for r in records:
                if r["identity"] == identity and not r.get("revoked_at"):
                    r["revoked_at"] = now
                    revoked.append(r["serial"])
            if not revoked:
                known = any(r["identity"] == identity for r in records)
                raise UsageError(f"{identity!r}: " + ("every certificate is already revoked" if known
                                                      else "no certificate was issued to this identity by this CA"))
            self._write_issued(records)
            self._write_crl(ca_key, ca_cert, records)
        return revoked

    def issued(self) -> list[dict[str, Any]]:
        return self._issued()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def identity_of(cert_path: str | Path) -> str:
    """The identity (subject common name) a certificate carries: what the broker uses as the username."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""

