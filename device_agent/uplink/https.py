"""HTTPS from the device to the fleet server: the TLS context and the header naming the device.

Both device-to-fleet HTTP clients use it: bundle downloads (`deploy/download.py`) and capture uploads
(`capture/uploader.py`). A fleet server started with `--tls-client-ca` knows the device by its client
certificate; without one, by `X-Edgekit-Device` (plus a device token where the route needs one).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

DEVICE_HEADER = "X-Edgekit-Device"


class TlsFiles(Protocol):
    """A section's TLS files (`[mqtt]`, `[deploy]`, `[capture]`): read through this protocol, never imported
    from the settings, which sit above the packages that use them."""

    @property
    def ca_certs(self) -> Path | None: ...
    @property
    def certfile(self) -> Path | None: ...
    @property
    def keyfile(self) -> Path | None: ...


def client_tls_context(*, ca_file: str | None = None, also_trust: str | None = None, certfile: str | None = None,
                       keyfile: str | None = None) -> ssl.SSLContext:
    """Which CAs sign fleet servers (`ca_file` replaces the system's; `also_trust` adds one to them)
    and this device's certificate, shown to a server that asks. Raises ssl.SSLError, OSError or
    ValueError for files that cannot be used."""
    context = ssl.create_default_context(cafile=ca_file)
    if also_trust is not None:
        context.load_verify_locations(cafile=also_trust)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context
