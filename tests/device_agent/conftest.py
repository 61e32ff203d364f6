"""Bundles and agents for the device agent's tests (built in code, nothing downloaded)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.signing import generate_keypair, load_private_key
from harness.bundles import make_bundle
from tests.helpers.fleet_double import FleetDouble


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key path, public key path) of a fresh Ed25519 pair."""
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def signing_key(keypair: tuple[Path, Path]) -> Ed25519PrivateKey:
    return load_private_key(keypair[0])


@pytest.fixture(scope="session")
def bundle_v1(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    """A signed fp32 digits-shaped bundle (read-only: copy it before changing it)."""
    return make_bundle(tmp_path_factory.mktemp("v1"), seed=0, version="1.0.0", signing_key=signing_key)


@pytest.fixture(scope="session")
def bundle_v2(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    """A second signed bundle of a different model (other weights), for hot updates."""
    return make_bundle(tmp_path_factory.mktemp("v2"), seed=1, version="2.0.0", signing_key=signing_key)


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock()


@pytest.fixture
def fleet() -> Iterator[FleetDouble]:
    """The capture tests' stand-in for the fleet's device routes, on 127.0.0.1."""
    double = FleetDouble()
    thread = threading.Thread(target=double.server.serve_forever, daemon=True)
    thread.start()
    yield double
    double.server.shutdown()
    double.server.server_close()
