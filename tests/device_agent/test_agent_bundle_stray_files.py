"""A real `edge-agent run` on a real Mosquitto with hostile files beside its good signed bundle: it keeps
serving the good one, its memory stays bounded, and its retained status topic names each bad file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.bundles import digits_like_inputs
from harness.processes import MosquittoBroker
from tests.helpers.hostile_zips import bomb_beside, encrypted_zip, unsupported_method_zip
from tests.helpers.mqtt import AgentProcess, Subscriber, wait_until

pytestmark = pytest.mark.integration

FAST = "[agent]\nwatch_interval = 0.2\n[mqtt]\nreconnect_min = 0.2\nreconnect_max = 1.0\n"
# Peak resident memory allowed: the agent with a digits model needs about 100 MB; reading the 600 MiB
# bomb the old way took it past 700 MB.
MAX_PEAK_RSS_MB = 250


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def named_in_status(status: dict, name: str) -> bool:  # type: ignore[type-arg]
    return any(name in r["path"] for r in status.get("rejected_bundles", []))


def test_stray_files_beside_a_good_bundle_are_skipped_reported_and_cost_no_memory(
        mosquitto: MosquittoBroker, bundle_v1: Path, tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    folder = tmp_path / "bundles"
    folder.mkdir()
    shutil.copy(bundle_v1, folder / "good.edgebundle")
    os.utime(folder / "good.edgebundle", (1_000, 1_000))
    (folder / "encrypted.edgebundle").write_bytes(encrypted_zip())  # newest file at start-up
    sub = Subscriber(mosquitto.port)
    agent = AgentProcess(tmp_path, "--bundle", str(folder), "--broker", mosquitto.url, "--device-id", "dev-s",
                         "--fleet", "test", "--spool", str(tmp_path / "s.db"), "--window-seconds", "1",
                         "--pubkey", str(keypair[1]), config=FAST)
    try:
        v1 = agent.status()["model"]
        assert v1["version"] == "1.0.0"
        assert named_in_status(agent.status(), "encrypted.edgebundle")

        (folder / "method.edgebundle").write_bytes(unsupported_method_zip())
        wait_until(lambda: named_in_status(agent.status(), "method.edgebundle"), 15, "the unknown method refused")
        bomb = folder / "bomb.edgebundle"
        (folder / "bomb.tmp").write_bytes(bomb_beside(bundle_v1, mib=600))
        (folder / "bomb.tmp").rename(bomb)
        assert bomb.stat().st_size < 1024**2
        wait_until(lambda: named_in_status(agent.status(), "bomb.edgebundle"), 20, "the zip bomb refused")

        status = agent.status()
        assert status["model"] == v1 and status["bundle"].endswith("good.edgebundle")
        assert "model.onnx" in next(r["error"] for r in status["rejected_bundles"] if "bomb" in r["path"])
        assert agent.post("/predict", {"inputs": digits_like_inputs(3).tolist()})["model"] == v1
        assert peak_rss_mb(agent.proc.pid) < MAX_PEAK_RSS_MB

        def retained_names_all() -> bool:
            return any(all(named_in_status(s, n) for n in ("encrypted", "method", "bomb")) for s, _ in sub.status)

        wait_until(retained_names_all, 15, "every bad file named on the status topic")
    finally:
        assert agent.stop() == 0
        sub.close()
