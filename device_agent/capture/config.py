"""The `[capture]` section of the agent config: field capture (docs/captures.md).

Declared with `setting(...)` like every other section (`device_agent.settings` lists it in its
SECTIONS, so docs/config-agent.md shows it). `check_capture` holds the rules that need other keys or
files; the TLS identity falls back to `[deploy]`'s and then `[mqtt]`'s (`tls_files`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from device_agent.errors import ConfigError
from device_agent.settings_schema import POSITIVE, setting
from device_agent.uplink.https import TlsFiles

MIB = 1024**2
MAX_BATCH_RECORDS = 1000  # the fleet refuses a batch of more (docs/captures.md)
UPLOAD_PATH = "/api/captures/upload"
LABELS_PATH = "/api/captures/labels"


def upload_url_problem(url: str) -> str | None:
    """Why `url` cannot be the fleet server's base URL, or None when it can."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} must be http://HOST[:PORT] or https://HOST[:PORT]"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (the device's token is `token_file`)"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _check_url(key: str, value: Any, config: Any) -> None:
    problem = upload_url_problem(value)
    if problem is not None:
        raise ConfigError(key, problem)


@dataclass(frozen=True)
class CaptureSettings:
    """Field capture, off by default: sampled real inputs, uploaded to the fleet server ([captures](captures.md)).

    A bounded set of the rows this device served, with the prediction and the label when one comes back."""

    enabled: bool = setting(False, "capture sampled inputs and upload them to `upload_url` (needs `upload_url` "
                            "and a credential: `token_file` or a client certificate)")
    fraction: float = setting(0.01, "share of predicted rows kept", lo=0.0, hi=1.0)
    bytes_per_day: int = setting(10 * MIB, "captured input bytes per UTC day, fleet requests included; rows "
                                 "over it are skipped and counted", lo=0)
    fleet_requests: bool = setting(False, "honour the fleet's requests for more samples (the `capture` topic)")
    max_requested: int = setting(1000, "most samples one fleet request may add", lo=0)
    spool_bytes: int = setting(64 * MIB, "bound of the capture spool; when full the oldest records are "
                               "dropped first (counted)", lo=4096)
    state_dir: Path | None = setting(None, "where the spool `captures.db` lives; unset = "
                                     "`$STATE_DIRECTORY/capture`, else `./edge-agent-capture`")
    upload_url: str | None = setting(None, "the fleet server's base URL, `http://` or `https://` (uploads go to "
                                     f"`{UPLOAD_PATH}`)", check=_check_url, allowed="an http(s) URL")
    token_file: Path | None = setting(None, "file holding this device's upload token (`edge-kit fleet enroll` "
                                      "writes `upload.token`), sent as `Authorization: Device <token>`")
    ca_certs: Path | None = setting(None, "CA (PEM) for an `https://` fleet server signed by a private CA; "
                                    "unset = `deploy.ca_certs`, else the system's plus `mqtt.ca_certs`")
    certfile: Path | None = setting(None, "client certificate (PEM) shown to an `https://` fleet server; unset = "
                                    "`deploy.certfile`, else `mqtt.certfile`")
    keyfile: Path | None = setting(None, "the `certfile`'s private key (PEM); follows `certfile`'s fallback")
    batch_records: int = setting(64, "records in one upload", lo=1, hi=MAX_BATCH_RECORDS)
    batch_bytes: int = setting(1 * MIB, "bytes of records in one upload (one record over it goes alone; the "
                               "fleet's limit is `--captures-max-batch-bytes`, 4 MiB by default)", lo=1024)
    upload_interval: float = setting(10.0, "seconds between upload rounds (after a failure the wait doubles, "
                                     "up to 5 minutes)", **POSITIVE)

    def state_path(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        # systemd's StateDirectory= sets this, as for the spool and deployments.
        state = os.environ.get("STATE_DIRECTORY")
        return Path(state.split(":")[0]) / "capture" if state else Path("edge-agent-capture")


@dataclass(frozen=True)
class UploadTls:
    """The TLS identity uploads use: `ca_file` replaces the system's CAs, `also_trust` adds one."""

    ca_file: Path | None = None
    also_trust: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None


def tls_files(capture: CaptureSettings, deploy: TlsFiles | None = None, mqtt: TlsFiles | None = None) -> UploadTls:
    """`[capture]`'s own files, else `[deploy]`'s, else `[mqtt]`'s (the device's enrolled certificate, and the
    fleet CA trusted besides the system's), the same fallback bundle downloads use."""
    certfile, keyfile = capture.certfile, capture.keyfile
    for other in (deploy, mqtt):
        if certfile is None and other is not None:
            certfile, keyfile = other.certfile, other.keyfile
    ca_file = capture.ca_certs if capture.ca_certs is not None else (deploy.ca_certs if deploy is not None else None)
    also_trust = mqtt.ca_certs if mqtt is not None and ca_file is None else None
    return UploadTls(ca_file, also_trust, certfile, keyfile)


def check_capture(capture: CaptureSettings, *, deploy: TlsFiles | None = None, mqtt: TlsFiles | None = None) -> None:
    """Rules across keys and files, checked when the agent starts with capture enabled; ConfigError naming
    the key."""
    if not capture.enabled:
        return
    if capture.upload_url is None:
        raise ConfigError("capture.enabled", "needs capture.upload_url: the fleet server the records go to",
                          hint="set capture.upload_url = \"https://fleet.example:8080\"")
    for key in ("token_file", "ca_certs", "certfile", "keyfile"):
        path = getattr(capture, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"capture.{key}", f"file not found: {path}")
    if capture.keyfile is not None and capture.certfile is None:
        raise ConfigError("capture.keyfile", "needs capture.certfile (the certificate this key belongs to)")
    tls = tls_files(capture, deploy, mqtt)
    https = capture.upload_url.startswith("https:")
    if capture.token_file is None and (tls.certfile is None or not https):
        why = "a client certificate is only shown over https://" if tls.certfile is not None else "none is set"
        raise ConfigError("capture.enabled", f"needs a device credential: capture.token_file, or a client "
                                             f"certificate (capture.certfile, deploy.certfile or mqtt.certfile) "
                                             f"with an https:// upload_url ({why})")
    if capture.token_file is not None:
        try:
            token = capture.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("capture.token_file", f"cannot read {capture.token_file}: {exc}") from None
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError("capture.token_file", f"{capture.token_file} does not hold one token (one line, "
                                                    "no spaces)")
