"""Only bundles signed by the fleet's key give a model its reference, and none replaces one in use.

The attack: a file in `--bundles` with the signed bundle's model.onnx and a rewritten reference.json
(here: the drifted data's own histograms). Were it to replace the signed reference, every drifted
window would match it and no alert could fire."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.format import MANIFEST, REFERENCE, SIGNATURE, canonical_json, read_bundle, write_bundle
from device_agent.bundle.signing import generate_keypair, load_private_key, load_public_key
from device_agent.errors import VerificationError
from edge_kit.errors import ConfigError
from edge_kit.fleet.reference_index import ReferenceConflict, ReferenceStore
from edge_kit.fleet.settings import load_settings
from harness.fleetkit import DigitsBundle
from harness.processes import MosquittoBroker, cli_env, free_port, wait_for_port
from tests.helpers.mqtt import wait_until


def rebundle(source: Path, out: Path, *, key: Path | None = None, reference: dict | None = None,
             version: str | None = None) -> Path:
    """A copy of `source` with the same model.onnx, optionally re-signed, another reference or version."""
    bundle = read_bundle(source)
    members = {k: v for k, v in bundle.members.items() if k not in (MANIFEST, SIGNATURE)}
    if reference is not None:
        members[REFERENCE] = canonical_json(reference)
    manifest = dict(bundle.manifest) | ({"version": version} if version else {})
    return write_bundle(out, manifest, members, signing_key=load_private_key(key) if key else None)


def forged_reference(bundle: DigitsBundle) -> dict:
    """The reference with every channel's counts reversed: what a window drifted that way would match."""
    ref = json.loads(read_bundle(bundle.path).members[REFERENCE])
    for channel in ref["channels"].values():
        channel["counts"] = list(reversed(channel["counts"]))
    return ref


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def test_with_a_key_only_signed_bundles_are_used_and_the_rest_counted(
        digits_bundle: DigitsBundle, keys: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    private, public = keys
    folder = tmp_path / "bundles"
    signed = rebundle(digits_bundle.path, folder, key=private)
    forged = rebundle(digits_bundle.path, tmp_path / "f", reference=forged_reference(digits_bundle))
    shutil.move(forged, folder / "0-forged.edgebundle")  # sorts first: it would be read first
    other_private, _ = generate_keypair(tmp_path / "other")
    stranger = rebundle(digits_bundle.path, tmp_path / "s", key=other_private,
                        reference=forged_reference(digits_bundle))
    shutil.move(stranger, folder / "1-stranger.edgebundle")
    (folder / "2-junk.edgebundle").write_bytes(b"not a zip")

    with caplog.at_level(logging.WARNING, logger="edge_kit.fleet.reference_index"):
        store = ReferenceStore(folder=folder, public_key=load_public_key(public))
    [ref] = store.all()
    assert ref.source == str(signed) and ref.signed_by == store.verified_by is not None
    original = read_bundle(digits_bundle.path).reference["channels"][ref.channel_names[0]]["counts"]
    assert ref.counts[0, : ref.bins[0]].tolist() == original != list(reversed(original))
    kinds = {Path(r.path).name: r.kind for r in store.rejected()}
    assert kinds == {"0-forged.edgebundle": "unsigned", "1-stranger.edgebundle": "bad_signature",
                     "2-junk.edgebundle": "unreadable"}
    assert store.rejection_counts() == {"unsigned": 1, "bad_signature": 1, "unreadable": 1}
    described = store.describe()
    assert described["signature_required"] is True and len(described["rejected"]) == 3
    assert "skipping bundle" in caplog.text and "0-forged.edgebundle (unsigned)" in caplog.text

    # An explicit --bundle that is not signed by the key is an error (exit 4), not a skip.
    with pytest.raises(VerificationError) as err:
        ReferenceStore([folder / "0-forged.edgebundle"], public_key=load_public_key(public))
    assert err.value.exit_code == 4


def test_a_loaded_reference_is_never_replaced_by_another_for_the_same_model(
        digits_bundle: DigitsBundle, keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    folder = tmp_path / "bundles"
    signed = rebundle(digits_bundle.path, folder, key=private)
    pristine = shutil.copy(signed, tmp_path / "pristine.edgebundle")
    store = ReferenceStore(folder=folder, rescan_interval=0.0)
    before = store.get(digits_bundle.sha256)
    assert before is not None and before.source == str(signed)

    # Without a key too: a later file with the same model and another reference is refused ...
    forged = rebundle(digits_bundle.path, tmp_path / "f", reference=forged_reference(digits_bundle), version="1.0.1")
    shutil.move(forged, folder / "forged.edgebundle")
    store.rescan(force=True)
    assert store.get(digits_bundle.sha256) is before
    assert [(Path(r.path).name, r.kind) for r in store.rejected()] == [("forged.edgebundle", "reference_conflict")]
    # ... also one signed by the fleet's own key (a re-signed old or rewritten reference) ...
    resigned = rebundle(digits_bundle.path, tmp_path / "r", key=private, reference=forged_reference(digits_bundle),
                        version="1.0.2")
    shutil.move(resigned, folder / "resigned.edgebundle")
    keyed = ReferenceStore([signed], folder, public_key=load_public_key(public))
    assert keyed.get(digits_bundle.sha256).source == str(signed)  # type: ignore[union-attr]
    assert {r.kind for r in keyed.rejected()} == {"unsigned", "reference_conflict"}
    # ... and so is the file in use, rewritten in place with another reference.
    time.sleep(0.01)
    rewritten = rebundle(digits_bundle.path, tmp_path / "w", key=private, reference=forged_reference(digits_bundle))
    shutil.move(rewritten, signed)
    store.rescan(force=True)
    assert store.get(digits_bundle.sha256) is before
    assert np.array_equal(store.get(digits_bundle.sha256).counts, before.counts)  # type: ignore[union-attr]
    # forged, resigned (this store has no key, so only the conflict stops it) and the rewrite
    assert store.rejection_counts() == {"reference_conflict": 3}

    # A plain copy of the bundle in use changes nothing and is not a rejection; a refused file that
    # is removed leaves the list (its count stays).
    (folder / "resigned.edgebundle").unlink()
    shutil.copy(pristine, folder / "copy.edgebundle")
    store.rescan(force=True)
    assert store.get(digits_bundle.sha256) is before
    assert {Path(r.path).name for r in store.rejected()} == {"forged.edgebundle", "digits-1.0.0.edgebundle"}
    assert store.rejection_counts() == {"reference_conflict": 3}


def test_explicit_bundles_that_conflict_are_an_error(digits_bundle: DigitsBundle, tmp_path: Path) -> None:
    forged = rebundle(digits_bundle.path, tmp_path / "f", reference=forged_reference(digits_bundle), version="9")
    with pytest.raises(ReferenceConflict, match=r"another reference\.json"):
        ReferenceStore([digits_bundle.path, forged])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


@pytest.mark.slow
@pytest.mark.integration
def test_fleet_serve_with_pubkey_reports_what_it_refused(
        digits_bundle: DigitsBundle, keys: tuple[Path, Path], tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    private, public = keys
    folder = tmp_path / "bundles"
    signed = rebundle(digits_bundle.path, folder, key=private)
    shutil.move(rebundle(digits_bundle.path, tmp_path / "f", reference=forged_reference(digits_bundle)),
                folder / "0-forged.edgebundle")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", mosquitto.url, "--db",
            f"sqlite:///{tmp_path}/fleet.db", "--http", f"127.0.0.1:{port}", "--fleet", "sig", "--bundles",
            str(folder), "--pubkey", str(public), "--open-reads"]
    with log.open("wb") as out:
        server = subprocess.Popen(argv, env=cli_env(), stdout=out, stderr=out, start_new_session=True)
    try:
        wait_for_port(port, timeout=90)
        devices = json.loads(_get(f"{base}/api/devices"))
        [model] = devices["models"]
        assert model["source"] == str(signed) and model["signed_by"] == devices["bundles"]["verified_by"]
        assert [(Path(r["path"]).name, r["kind"]) for r in devices["bundles"]["rejected"]] == [
            ("0-forged.edgebundle", "unsigned")]
        assert 'edgekit_fleet_bundles_rejected_total{kind="unsigned"} 1' in _get(f"{base}/metrics").decode()
        # A file signed by the fleet's key but rewriting the reference, dropped in while it runs.
        shutil.move(rebundle(digits_bundle.path, tmp_path / "r", key=private, reference=forged_reference(digits_bundle),
                             version="1.0.1"), folder / "1-resigned.edgebundle")
        wait_until(lambda: 'edgekit_fleet_bundles_rejected_total{kind="reference_conflict"} 1'
                   in _get(f"{base}/metrics").decode(), 30, "the conflicting bundle counted")
        [model] = json.loads(_get(f"{base}/api/devices"))["models"]
        assert model["source"] == str(signed) and model["version"] == "1.0.0"
        assert "0-forged.edgebundle (unsigned)" in log.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    # A --bundle the key (here from the fleet config) did not sign stops the server before it starts (exit 4).
    config = tmp_path / "fleet.toml"
    config.write_text(f'[bundles]\npubkey = "{public.relative_to(tmp_path)}"\n')
    refused = subprocess.run([*argv[:argv.index("--bundles")], "--bundle", str(folder / "0-forged.edgebundle"),
                              "--config", str(config)], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 4 and "unsigned" in refused.stderr


def test_the_fleet_config_names_the_key_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "fleet.toml"
    config.write_text('[bundles]\npubkey = "keys/edgekit.pub"\n')
    assert load_settings(config).bundles.pubkey == str(tmp_path / "etc" / "keys" / "edgekit.pub")
    assert load_settings(None).bundles.pubkey is None
    config.write_text("[bundles]\npubkey = 3\n")
    with pytest.raises(ConfigError, match=r"bundles\.pubkey"):
        load_settings(config)
