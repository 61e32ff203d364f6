"""`edge-kit inspect` never calls a signature it did not check "signed": it says "signature present,
not verified" unless --pubkey verified it."""

from __future__ import annotations

from pathlib import Path

from device_agent.bundle.signing import generate_keypair, load_private_key
from harness.bundles import make_bundle


def test_inspect_says_whether_it_verified_the_signature(edge_kit_cli, tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "b", signing_key=load_private_key(private))
    unsigned = make_bundle(tmp_path / "u", seed=1)

    plain = edge_kit_cli("inspect", str(bundle), timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert "signature present, not verified" in plain.stdout

    checked = edge_kit_cli("inspect", str(bundle), "--pubkey", str(public), "--json", timeout=60)
    assert checked.returncode == 0, checked.stderr
    info = checked.json()
    assert info["signature_verified"] is True and info["signature"].startswith("signature verified")

    _, other = generate_keypair(tmp_path / "other")
    wrong = edge_kit_cli("inspect", str(bundle), "--pubkey", str(other), timeout=60)
    assert wrong.returncode == 4 and "manifest.sig" in wrong.stderr

    assert "UNSIGNED" in edge_kit_cli("inspect", str(unsigned), timeout=60).stdout
