"""The `[deploy]` section of the agent config: bundles the fleet deploys over the network.

Declared with `setting(...)` like every other section (`device_agent.settings` lists it in its
SECTIONS, so docs/config-agent.md shows it). `check_deploy` holds the rules that need other keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError
from device_agent.settings_schema import setting

_POSITIVE: dict[str, Any] = {"lo": 0.0, "open_lo": True}


@dataclass(frozen=True)
class DeploySettings:
    """Deployments from the fleet: a retained MQTT message points at a bundle; the agent downloads, verifies,
    self-tests and swaps it in, keeping the previous bundle to roll back to (docs/agent.md)."""

    enabled: bool = setting(False, "act on deployment messages on `edgekit/<fleet>/<device>/deployment` "
                            "(needs `agent.pubkey` and `agent.bundle` to be a folder)")
    state_dir: Path | None = setting(None, "downloads in progress (`staging/`), kept bundles (`kept/`) and "
                                     "`deployment.json`; unset = `$STATE_DIRECTORY/deploy`, else "
                                     "`./edge-agent-deploy`")
    max_bundle_bytes: int = setting(256 * 1024**2, "largest bundle file the agent downloads (bytes)", lo=1)
    keep: int = setting(2, "bundles that served before, kept to roll back to", lo=1)
    download_timeout: float = setting(30.0, "seconds a download may wait to connect or for the next bytes "
                                      "before it resumes on a new connection", **_POSITIVE)
    give_up_after: float = setting(600.0, "seconds of failed download attempts before `failed` is reported "
                                   "(the agent keeps trying every 30 s)", **_POSITIVE)
    ca_certs: Path | None = setting(None, "CA (PEM) for `https://` bundle URLs signed by a private CA; unset = "
                                    "the system's, plus `mqtt.ca_certs` (the fleet CA) when set")
    certfile: Path | None = setting(None, "client certificate (PEM) shown to an `https://` fleet server that asks "
                                    "for one (`fleet serve --tls-client-ca`); unset = `mqtt.certfile`")
    keyfile: Path | None = setting(None, "the `certfile`'s private key (PEM); unset with `certfile` unset = "
                                   "`mqtt.keyfile`")

    def state_path(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        # systemd's StateDirectory= sets this, as for the spool.
        state = os.environ.get("STATE_DIRECTORY")
        return Path(state.split(":")[0]) / "deploy" if state else Path("edge-agent-deploy")


def check_deploy(deploy: DeploySettings, *, bundle: Path | None, pubkey: Path | None) -> None:
    """Rules across sections, checked when the agent starts with deployments enabled."""
    if not deploy.enabled:
        return
    if pubkey is None:
        # The message is only a pointer; the bundle's own signature is what the device trusts.
        raise ConfigError("deploy.enabled", "needs agent.pubkey: a deployed bundle must verify against this "
                                            "device's key", hint="set agent.pubkey or pass --pubkey PUB.pem")
    if bundle is None or not bundle.is_dir():
        raise ConfigError("deploy.enabled", f"needs agent.bundle to be a folder (got {bundle}): deployed bundles "
                                            "are installed there, so a restart serves them")
    for key in ("ca_certs", "certfile", "keyfile"):
        path = getattr(deploy, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"deploy.{key}", f"file not found: {path}")
    if deploy.keyfile is not None and deploy.certfile is None:
        raise ConfigError("deploy.keyfile", "needs deploy.certfile (the certificate this key belongs to)")
