"""Which bundle may serve, through the embedded API on real signed bundle files: signatures need a key,
the agent serves one product, versions go only up (PEP 440), and a rollback is the one way down."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent, load_model
from device_agent.bundle.format import read_bundle, read_manifest
from device_agent.bundle.signing import load_public_key
from device_agent.bundle.watcher import BundleWatcher
from device_agent.errors import EXIT_USAGE, EXIT_VERIFICATION, ConfigError, UsageError, VerificationError
from harness.bundles import make_bundle


@pytest.fixture(scope="module")
def forged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A well-formed bundle signed by a key that is not the build server's."""
    return make_bundle(tmp_path_factory.mktemp("forged"), seed=7, version="3.0.0",
                       signing_key=Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    """Another product, properly signed, with a higher version than any digits bundle here."""
    return make_bundle(tmp_path_factory.mktemp("faces"), seed=3, name="faces", version="9.0.0",
                       signing_key=signing_key)


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> dict[str, Path]:
    """Signed digits bundles whose versions a textual order gets wrong, and one outside PEP 440."""
    return {v: make_bundle(tmp_path_factory.mktemp(f"v{i}"), seed=10 + i, version=v, signing_key=signing_key)
            for i, v in enumerate(["1.3.0rc2", "1.3.0rc10", "1.3.0", "1.3.0.post1", "2024-spring"])}


def _folder(tmp_path: Path, *bundles: Path) -> Path:
    d = tmp_path / "bundles"
    d.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(bundles):  # later arguments get newer file dates
        shutil.copy(b, d / b.name)
        os.utime(d / b.name, (1_000 + i, 1_000 + i))
    return d


def _serving(agent: Agent) -> tuple[str, str]:
    info = agent.model.runtime.info
    return info.name, info.version


# -- signatures ------------------------------------------------------------------------------------

def test_require_signature_without_a_key_refuses_instead_of_accepting_a_forged_bundle(
        forged: Path, tmp_path: Path, clock) -> None:
    for attempt in (lambda: Agent(forged, require_signature=True, clock=clock),
                    lambda: Agent(_folder(tmp_path, forged), require_signature=True, clock=clock),
                    lambda: load_model(forged, require_signature=True),
                    lambda: read_bundle(forged, require_signature=True),
                    lambda: read_manifest(forged, require_signature=True)):
        with pytest.raises(UsageError, match="no public key") as err:
            attempt()
        assert err.value.exit_code == EXIT_USAGE


def test_with_the_key_the_forged_bundle_is_refused_and_the_real_one_serves(
        forged: Path, bundle_v1: Path, tmp_path: Path, keypair: tuple[Path, Path], clock) -> None:
    key = load_public_key(keypair[1])
    with pytest.raises(VerificationError, match="signature") as err:
        Agent(forged, public_key=key, require_signature=True, clock=clock)
    assert err.value.exit_code == EXIT_VERIFICATION
    agent = Agent(_folder(tmp_path, bundle_v1, forged), public_key=key, require_signature=True, clock=clock)
    assert _serving(agent) == ("digits", "1.0.0") and agent.model.signed_by is not None
    assert [r["path"].endswith(forged.name) for r in agent.status()["rejected_bundles"]] == [True]


# -- one product -----------------------------------------------------------------------------------

def test_start_up_serves_the_configured_model_not_another_with_a_higher_version(
        bundle_v2: Path, faces: Path, tmp_path: Path, keypair: tuple[Path, Path], clock) -> None:
    folder = _folder(tmp_path, bundle_v2, faces)  # faces 9.0.0 is also the newest file
    agent = Agent(folder, public_key=load_public_key(keypair[1]), model_name="digits", clock=clock)
    assert _serving(agent) == ("digits", "2.0.0")
    [refused] = agent.status()["rejected_bundles"]
    assert refused["path"] == str(folder / faces.name)
    assert "model 'faces'" in refused["error"] and "agent.model_name" in refused["error"]


def test_start_up_without_a_model_name_refuses_to_guess_between_two_products(
        bundle_v2: Path, faces: Path, tmp_path: Path, keypair: tuple[Path, Path], clock) -> None:
    with pytest.raises(ConfigError, match=r"agent\.model_name") as err:
        Agent(_folder(tmp_path, bundle_v2, faces), public_key=load_public_key(keypair[1]), clock=clock)
    assert "'digits'" in str(err.value) and "'faces'" in str(err.value) and err.value.exit_code == EXIT_USAGE


def test_a_configured_model_with_no_bundle_of_its_name_does_not_start(faces: Path, clock) -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        Agent(faces, model_name="", clock=clock)
    with pytest.raises(VerificationError, match="this agent serves 'digits'"):
        Agent(faces, model_name="digits", clock=clock)
    with pytest.raises(VerificationError, match="this agent serves 'digits'"):
        Agent(load_model(faces), model_name="digits", clock=clock)  # a preloaded model too


def test_the_first_bundle_served_pins_the_product_for_updates(
        bundle_v1: Path, faces: Path, tmp_path: Path, clock) -> None:
    folder = _folder(tmp_path, bundle_v1)
    agent = Agent(folder, clock=clock)
    watcher = BundleWatcher(folder, agent.update)
    shutil.copy(faces, folder / faces.name)
    assert watcher.check()
    assert _serving(agent) == ("digits", "1.0.0")
    assert "the first bundle it served" in agent.status()["update"]["error"]
    with pytest.raises(VerificationError, match="model 'faces'"):
        agent.rollback_to(folder / faces.name)  # not even as a rollback


# -- versions --------------------------------------------------------------------------------------

def test_start_up_ranks_release_candidates_and_post_releases_in_pep440_order(
        versioned: dict[str, Path], tmp_path: Path, clock) -> None:
    rc = _folder(tmp_path / "rc", versioned["1.3.0rc10"], versioned["1.3.0rc2"])  # rc2 is the newer file
    assert _serving(Agent(rc, clock=clock)) == ("digits", "1.3.0rc10")
    post = _folder(tmp_path / "post", versioned["1.3.0.post1"], versioned["1.3.0"])
    assert _serving(Agent(post, clock=clock)) == ("digits", "1.3.0.post1")


def test_updates_follow_pep440_order(versioned: dict[str, Path], clock) -> None:
    agent = Agent(versioned["1.3.0rc2"], clock=clock)
    agent.update(versioned["1.3.0rc10"])
    agent.update(versioned["1.3.0"])
    agent.update(versioned["1.3.0.post1"])
    assert _serving(agent) == ("digits", "1.3.0.post1")
    with pytest.raises(VerificationError, match="not newer"):
        agent.update(versioned["1.3.0"])


def test_a_version_outside_pep440_serves_only_when_nothing_orderable_does(
        versioned: dict[str, Path], bundle_v1: Path, tmp_path: Path, clock) -> None:
    odd = versioned["2024-spring"]
    agent = Agent(bundle_v1, clock=clock)
    with pytest.raises(VerificationError, match="'2024-spring' is not a PEP 440 version"):
        agent.update(odd)
    assert _serving(agent) == ("digits", "1.0.0")
    folder = _folder(tmp_path, bundle_v1, odd)  # the odd one is the newer file
    assert _serving(Agent(folder, clock=clock)) == ("digits", "1.0.0")
    assert _serving(Agent(odd, clock=clock)) == ("digits", "2024-spring")  # alone, it is the first bundle
    stuck = Agent(odd, clock=clock)
    with pytest.raises(VerificationError, match="'2024-spring' is not a PEP 440 version"):
        stuck.update(bundle_v1)  # nothing orders after it either


# -- rollback --------------------------------------------------------------------------------------

def test_rollback_is_the_one_way_down_and_verifies_like_an_update(
        bundle_v1: Path, bundle_v2: Path, forged: Path, tmp_path: Path, keypair: tuple[Path, Path],
        clock) -> None:
    agent = Agent(bundle_v2, public_key=load_public_key(keypair[1]), clock=clock)
    with pytest.raises(VerificationError, match="not newer"):
        agent.update(bundle_v1)
    with pytest.raises(VerificationError, match="signature"):
        agent.rollback_to(forged)
    corrupt = tmp_path / "corrupt.edgebundle"
    corrupt.write_bytes(bundle_v1.read_bytes()[:-200])
    with pytest.raises(VerificationError):
        agent.rollback_to(corrupt)
    assert _serving(agent) == ("digits", "2.0.0")
    result = agent.rollback_to(bundle_v1)
    assert result["ok"] and result["action"] == "rollback" and result["changed"]
    assert result["from"]["version"] == "2.0.0" and result["to"]["version"] == "1.0.0"
    assert _serving(agent) == ("digits", "1.0.0") and agent.status()["update"]["action"] == "rollback"
    assert agent.update(bundle_v2)["action"] == "update"  # and up again as usual
    assert _serving(agent) == ("digits", "2.0.0")


def test_a_missing_bundle_is_a_usage_error_not_a_verification_failure(tmp_path: Path, clock) -> None:
    for attempt in (lambda: Agent(tmp_path / "missing.edgebundle", clock=clock),
                    lambda: read_manifest(tmp_path / "missing.edgebundle")):
        with pytest.raises(UsageError, match="bundle not found") as err:
            attempt()
        assert not isinstance(err.value, VerificationError) and err.value.exit_code == EXIT_USAGE
