"""End to end: real `edge-agent run` processes (each with its own folders) rolled out by a real `fleet serve`
over a real Mosquitto, through the CLI. A good bundle (the same model under a new version) goes canary ->
promote -> done; a bundle that passes verification and self-test but predicts differently (other weights)
is halted at the canary and rolled back, and the control devices never see it; a bundle that fails its
self-test on the canary halts the rollout at once."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.bundle.format import MANIFEST, MODEL, SIGNATURE, read_bundle, write_bundle
from device_agent.bundle.signing import generate_keypair, load_private_key
from harness.bundles import digits_like_inputs, make_bundle
from harness.fleetkit import OPERATOR_TOKEN
from harness.processes import MosquittoBroker, free_port, run_cli
from tests.edge_kit.fleet.test_fleet_deploy_mqtt import FleetServer
from tests.helpers.mqtt import AgentProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "e2e"
DEVICES = ["dev-a", "dev-b", "dev-c"]


class Traffic:
    """Requests to every agent, so each window holds predictions for the canary to compare."""

    def __init__(self, agents: dict[str, AgentProcess]) -> None:
        self.agents = agents
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seed = 0
        while not self.stop.wait(0.1):
            for agent in list(self.agents.values()):
                seed += 1
                # An agent swapping its model or being stopped may refuse one: the next round tries again.
                with contextlib.suppress(OSError):
                    agent.post("/predict", {"inputs": digits_like_inputs(16, seed=seed).tolist()})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _same_model_new_version(bundle: Path, out: Path, version: str, key: Ed25519PrivateKey) -> Path:
    """The same computation under a new version (and new model bytes: a doc string), so its model sha256
    differs and the fleet tells its windows apart, while its predictions and latency match the old one's."""
    old = read_bundle(bundle)
    model = onnx.load_from_string(old.members[MODEL])
    model.doc_string = f"digits {version}"
    members = {k: v for k, v in old.members.items() if k not in (MANIFEST, SIGNATURE)}
    members[MODEL] = model.SerializeToString()
    return write_bundle(out, {**old.manifest, "version": version}, members, signing_key=key)


def _rollout(base: str, token: Path, dep: str) -> dict[str, Any]:
    r = run_cli("edge_kit", "fleet", "rollout", dep, "--server", base, "--token-file", str(token), "--json",
                timeout=120)
    assert r.returncode == 0, r.stderr
    return r.json()


def test_canary_promote_then_a_skewed_bundle_rolled_back(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    key = load_private_key(private)
    made = {"v1": make_bundle(tmp_path / "v1", seed=0, version="1.0.0", signing_key=key),
            # Other weights: verifies and passes its own self-test, but predicts other classes than v1.
            "skewed": make_bundle(tmp_path / "skewed", seed=1, version="1.2.0", signing_key=key),
            # Signed and well-formed, but its self-test expects outputs the model does not give: refused on devices.
            "broken": make_bundle(tmp_path / "broken", seed=0, version="1.3.0", signing_key=key,
                                  selftest_outputs=np.full((8, 10), 5.0, dtype=np.float32))}
    made["good"] = _same_model_new_version(made["v1"], tmp_path / "good", "1.1.0", key)
    folder = tmp_path / "fleet-bundles"
    folder.mkdir()
    shutil.copy2(made["v1"], folder / made["v1"].name)  # what the devices serve: the fleet knows it
    token = tmp_path / "token"
    token.write_text(OPERATOR_TOKEN)
    cfg = tmp_path / "fleet.toml"
    cfg.write_text("[drift]\nevaluate_every_seconds = 1\nmin_n = 50\n")
    (tmp_path / "broker").mkdir()
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = FleetServer(["fleet", "serve", "--broker", broker.url, "--db", f"sqlite:///{tmp_path}/fleet.db",
                          "--http", f"127.0.0.1:{port}", "--fleet", FLEET, "--bundles", str(folder), "--pubkey",
                          str(public), "--token-file", str(token), "--config", str(cfg)], tmp_path / "server.log", port)
    agents: dict[str, AgentProcess] = {}
    traffic: Traffic | None = None
    try:
        server.start()
        for device in DEVICES:
            root = tmp_path / device
            (root / "bundles").mkdir(parents=True)
            shutil.copy2(made["v1"], root / "bundles" / made["v1"].name)
            agents[device] = AgentProcess(
                root, "--bundle", str(root / "bundles"), "--broker", broker.url, "--device-id", device, "--fleet",
                FLEET, "--spool", str(root / "spool.db"), "--pubkey", str(public), "--window-seconds", "2",
                config=f'[deploy]\nenabled = true\nstate_dir = "{root / "state"}"\n')
        traffic = Traffic(agents)

        def deploy(bundle: Path) -> dict[str, Any]:
            r = run_cli("edge_kit", "fleet", "deploy", str(bundle), "--server", base, "--token-file", str(token),
                        "--canary", "1", "--canary-windows", "2", "--auto-promote", "--json", timeout=120)
            assert r.returncode == 0, (r.stderr, (tmp_path / "server.log").read_text()[-3000:])
            return r.json()

        def version(device: str) -> str:
            return str(agents[device].status()["model"]["version"])

        # The fleet has seen every device and some of its windows (the control side of the canary).
        wait_until(lambda: run_cli("edge_kit", "fleet", "rollout", "none", "--server", base, "--token-file",
                                   str(token), timeout=60).returncode == 2, 60, "the API")
        def windows() -> int:
            req = urllib.request.Request(f"{base}/api/devices", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return sum(m["windows"] for m in json.loads(r.read())["models"])

        wait_until(lambda: windows() >= 9, 120, "windows from every device")

        good = deploy(made["good"])
        dep = good["deployment"]
        assert good["state"] == "canary" and sorted(good["devices"]) == DEVICES
        view = wait_until(lambda: (v := _rollout(base, token, dep))["state"] in ("done", "rolled_back") and v, 240,
                          "the good bundle rolled out")
        assert view["state"] == "done", view["canary"]
        assert view["canary"]["passed"] is True and view["canary"]["figures"]["predicted_class"]["ok"] is True
        wait_until(lambda: all(version(d) == "1.1.0" for d in DEVICES), 60, "every agent serving 1.1.0")

        bad = deploy(made["skewed"])
        bad_dep = bad["deployment"]
        canary = [d for d, v in bad["devices"].items() if v["state"] == "told"]
        assert len(canary) == 1
        view = wait_until(lambda: (v := _rollout(base, token, bad_dep))["state"] in ("rolling", "rolled_back") and v,
                          240, "the canary decision on the skewed bundle")
        assert view["state"] == "rolled_back", view["canary"]
        assert "predicted_class" in view["canary"]["failing"]
        wait_until(lambda: version(canary[0]) == "1.1.0", 60, "the canary back on 1.1.0")
        for d in DEVICES:
            if d != canary[0]:  # the control devices never saw the skewed bundle
                block = agents[d].status().get("deployment") or {}
                assert block.get("deployment") != bad_dep and version(d) == "1.1.0"
        r = run_cli("edge_kit", "fleet", "rollout", bad_dep, "--server", base, "--token-file", str(token),
                    "--promote", timeout=60)
        assert r.returncode == 2 and "only a canary can be promoted" in r.stderr

        # A bundle that fails its self-test on the canary halts the rollout at once (no windows needed).
        broken = deploy(made["broken"])
        view = wait_until(lambda: (v := _rollout(base, token, broken["deployment"]))["state"] != "canary" and v, 240,
                          "the canary's failed install")
        assert view["state"] == "rolled_back" and view["canary"]["failing"] == ["install"], view["canary"]
        failed = [d for d, v in view["devices"].items() if v["state"] == "failed"]
        assert len(failed) == 1 and "selftest" in view["canary"]["figures"]["install"]["reasons"][failed[0]]
        assert all(version(d) == "1.1.0" for d in DEVICES)
    finally:
        if traffic is not None:
            traffic.close()
        for agent in agents.values():
            agent.stop()
        server.kill(signal.SIGTERM)
        broker.stop()
