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


def test_a_crafted_unsigned_manifest_cannot_fake_a_verified_line_or_drive_the_terminal(
        edge_kit_cli, tmp_path: Path) -> None:
    fake = "digits 1.0.0  (signature verified (key 0123456789abcdef), created 2026-01-01)"
    payload = f"2026\n\x1b[2K\r{fake}\x1b]0;pwned\x07\u202e\x9b31m"
    crafted = make_bundle(tmp_path / "c", seed=2, extra_manifest={
        "created_at": payload,
        "gate": {"metric": f"accuracy\r\x1b[1A{fake}", "passed": True, "fp32": 0.9, "int8": 0.9, "drop": 0.0},
        "provenance": {"mlflow": {"tracking_uri": "http://x\x1b[8m", "run_id": "\x00\x7f"}},
    })
    out = edge_kit_cli("inspect", str(crafted), timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = text.splitlines()
    assert lines[0].startswith("[UNSIGNED] ")  # the status comes before any string the manifest chose
    for bad in ("\x1b", "\x07", "\r", "\x00", "\x7f", "\x9b", "\u202e"):
        assert bad not in text, repr(bad)
    assert not any(line.lstrip().startswith("digits 1.0.0  (signature verified") for line in lines)
    assert sum("signature verified" in line for line in lines) == 2  # both fakes, shown as data inside lines
    assert "\\x1b[2K\\x0d" in lines[0] and "\\u202e" in lines[0]  # escaped, visibly
    assert len(lines) == len(edge_kit_cli("inspect", str(make_bundle(tmp_path / "p", seed=3)), timeout=60)
                             .stdout.splitlines())  # no line was added by the manifest
    # --json keeps the manifest's strings as they are, JSON-escaped, in one object.
    info = edge_kit_cli("inspect", str(crafted), "--json", timeout=60).json()
    assert info["created_at"] == payload and info["signature"] == "UNSIGNED"


def test_a_manifest_with_fields_of_the_wrong_type_is_shown_not_a_traceback(edge_kit_cli, tmp_path: Path) -> None:
    crafted = make_bundle(tmp_path / "c", seed=4, extra_manifest={"gate": {"fp32": "high", "rounds": 3}})
    out = edge_kit_cli("inspect", str(crafted), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[UNSIGNED] digits 1.0.0") and "see --json" in out.stdout
