"""No silent downgrade: an older version dropped into the watched folder is refused (and reported) unless
the agent was started with allow_downgrade, another model's bundle always; require_signature needs a key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.agent import Agent
from device_agent.bundle.signing import load_public_key
from device_agent.bundle.watcher import BundleWatcher
from device_agent.errors import VerificationError
from harness.bundles import make_bundle


@pytest.fixture(scope="module")
def older(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    return make_bundle(tmp_path_factory.mktemp("old"), seed=2, version="0.9.0", signing_key=signing_key)


@pytest.fixture(scope="module")
def other_name(tmp_path_factory: pytest.TempPathFactory, signing_key: Ed25519PrivateKey) -> Path:
    return make_bundle(tmp_path_factory.mktemp("other"), seed=3, name="faces", version="9.0.0",
                       signing_key=signing_key)


def _folder(tmp_path: Path, *bundles: Path) -> Path:
    d = tmp_path / "bundles"
    d.mkdir(exist_ok=True)
    for i, b in enumerate(bundles):  # later arguments get newer file dates
        shutil.copy(b, d / b.name)
        os.utime(d / b.name, (1_000 + i, 1_000 + i))
    return d


def _drop(folder: Path, bundle: Path) -> Path:
    target = folder / f"dropped-{bundle.name}"
    shutil.copy(bundle, target)
    return target


@pytest.mark.parametrize("which", ["older", "other_name"])
def test_a_lower_version_or_another_model_dropped_in_is_refused_and_reported(
        request: pytest.FixtureRequest, bundle_v2: Path, tmp_path: Path, keypair: tuple[Path, Path], clock,
        which: str) -> None:
    folder = _folder(tmp_path, bundle_v2)
    agent = Agent(folder, public_key=load_public_key(keypair[1]), clock=clock)
    watcher = BundleWatcher(folder, agent.update)
    dropped = _drop(folder, request.getfixturevalue(which))
    assert watcher.check()
    assert agent.model.runtime.info.version == "2.0.0" and agent.model.runtime.info.name == "digits"
    status = agent.status()
    assert status["update"]["ok"] is False and dropped.name in status["update"]["error"]
    assert ("allow-downgrade" if which == "older" else "model_name") in status["update"]["error"]
    assert [r["path"] for r in status["rejected_bundles"]] == [str(dropped)]
    assert not watcher.check()  # remembered: not retried every poll


def test_allow_downgrade_accepts_an_older_version_but_never_another_model(
        older: Path, other_name: Path, bundle_v2: Path, tmp_path: Path, keypair: tuple[Path, Path], clock) -> None:
    folder = _folder(tmp_path, bundle_v2)
    agent = Agent(folder, public_key=load_public_key(keypair[1]), allow_downgrade=True, clock=clock)
    with pytest.raises(VerificationError, match="this agent serves 'digits'"):
        agent.update(_drop(folder, other_name))
    assert agent.model.runtime.info.name == "digits"
    agent.update(_drop(folder, older))
    assert agent.model.path.name == f"dropped-{older.name}"


def test_the_same_version_with_another_model_is_not_an_upgrade(bundle_v1: Path, tmp_path: Path, clock,
                                                               signing_key: Ed25519PrivateKey) -> None:
    rebuilt = make_bundle(tmp_path / "re", seed=5, version="1.0.0", signing_key=signing_key)
    agent = Agent(bundle_v1, clock=clock)
    with pytest.raises(VerificationError, match="not newer"):
        agent.update(rebuilt)
    assert agent.update(bundle_v1)["changed"] is False  # the same bundle again is no change, not an error


def test_start_up_serves_the_highest_version_not_the_newest_file(
        bundle_v1: Path, bundle_v2: Path, older: Path, tmp_path: Path, clock) -> None:
    folder = _folder(tmp_path, bundle_v1, bundle_v2, older)  # the 0.9.0 file is the newest
    assert Agent(folder, clock=clock).model.runtime.info.version == "2.0.0"
    assert Agent(folder, allow_downgrade=True, clock=clock).model.runtime.info.version == "0.9.0"


def test_a_good_bundle_is_not_hidden_by_a_stray_file_dropped_after_it(
        bundle_v1: Path, bundle_v2: Path, tmp_path: Path, clock) -> None:
    folder = _folder(tmp_path, bundle_v1)
    agent = Agent(folder, clock=clock)
    watcher = BundleWatcher(folder, agent.update)
    shutil.copy(bundle_v2, folder / "v2.edgebundle")
    os.utime(folder / "v2.edgebundle", (2_000, 2_000))
    (folder / "stray.edgebundle").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    os.utime(folder / "stray.edgebundle", (3_000, 3_000))
    watcher.check()
    assert agent.model.runtime.info.version == "2.0.0"
    assert "stray.edgebundle" in agent.status()["rejected_bundles"][0]["path"]


def test_require_signature_without_a_public_key_is_exit_2(edge_agent_cli, bundle_v1: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[agent]\nrequire_signature = true\n")
    res = edge_agent_cli("run", "--config", str(cfg), "--bundle", str(bundle_v1), "--device-id", "d",
                         "--broker", "mqtt://127.0.0.1:1", "--spool", str(tmp_path / "s.db"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert "agent.require_signature" in res.stderr and "pubkey" in res.stderr
    assert "Traceback" not in res.stderr
