"""Ed25519 keys and signatures for bundle manifests."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.errors import UsageError

__all__ = [
    "PRIVATE_KEY_NAME", "PUBLIC_KEY_NAME", "check_signature_settings", "generate_keypair", "load_private_key",
    "load_public_key", "public_key_fingerprint", "sign", "signature_valid",
]

PRIVATE_KEY_NAME = "edgekit.key"
PUBLIC_KEY_NAME = "edgekit.pub"


def generate_keypair(out_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new private key (mode 0600) and its public key as PEM files; returns their paths.

    The folder is made (or tightened to) 0700. Each file is written to a new temp name opened with
    O_EXCL|O_NOFOLLOW and renamed over the old one: an existing world-readable key file does not keep
    its mode, and a symlink planted at the key's path is replaced, never followed.
    """
    out = Path(out_dir)
    _private_folder(out)
    private_path, public_path = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if not force and (os.path.lexists(private_path) or os.path.lexists(public_path)):
        raise UsageError(f"a key pair already exists in {out}", hint="pass --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _replace_file(private_path, private_pem, 0o600)
    _replace_file(public_path, public_pem, 0o644)
    return private_path, public_path


def _private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        try:
            folder.chmod(0o700)
        except OSError as exc:
            raise UsageError(f"cannot make the key folder {folder} private (0700): {exc}") from exc


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a symlink at `path` itself, not what it points to
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UsageError(f"private key not found: {path}") from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key", hint="make one with `edge-kit keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise UsageError(f"public key not found: {path}") from exc
    except ValueError as exc:
        raise UsageError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} is not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def signature_valid(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """Short hex id of a public key, shown in `inspect` and status messages."""
    import hashlib

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def check_signature_settings(public_key: Ed25519PublicKey | None, require_signature: bool) -> None:
    """Refuse `require_signature` without a key (UsageError, exit 2): with nothing to check a signature
    against, a bundle signed by anyone would pass, so the request cannot be honoured."""
    if require_signature and public_key is None:
        raise UsageError("require_signature is set but no public key was given: a signature cannot be checked "
                         "without one, so a bundle signed by anyone would pass",
                         hint="pass public_key (the build server's Ed25519 public key) or --pubkey PUB.pem")
