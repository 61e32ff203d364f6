"""End to end, every component real: `edge-agent run` processes (each with its own folders) capture what they
serve and upload it to a real `fleet serve` with their device tokens, over a link that fails, across a kill -9
of the agent and of the fleet server. Every captured row arrives exactly once, with its input bytes and its
label; a device whose config does not enable capture sends nothing, even when the fleet asks it to."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_kit.fleet.device_tokens import create_device_key, device_token
from harness.bundles import digits_like_inputs, make_bundle
from harness.fleetkit import OPERATOR_TOKEN
from harness.processes import MosquittoBroker, free_port, run_cli
from tests.edge_kit.fleet.test_fleet_deploy_mqtt import FleetServer
from tests.helpers.mqtt import AgentProcess, wait_until
from tests.helpers.tcp_proxy import CuttingProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEET = "cap"


def _get(base: str, path: str) -> Any:
    request = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _held(base: str) -> dict[str, tuple[int, int]]:
    """(held, labelled) captures per device, summed over model versions."""
    out: dict[str, tuple[int, int]] = {}
    try:
        rows = _get(base, "/api/captures/counts")["counts"]
    except (OSError, urllib.error.URLError):
        return out
    for row in rows:
        held, labelled = out.get(row["device"], (0, 0))
        out[row["device"]] = (held + int(row["held"]), labelled + int(row["labelled"]))
    return out


def _capture_config(root: Path, upload_url: str, token: Path) -> str:
    return (f'[capture]\nenabled = true\nfraction = 1.0\nfleet_requests = true\nupload_url = "{upload_url}"\n'
            f'token_file = "{token}"\nstate_dir = "{root / "capture"}"\nupload_interval = 0.5\n')


def test_captures_survive_kills_and_a_cut_link_and_arrive_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    bundle = make_bundle(folder, version="1.0.0")
    token = tmp_path / "token"
    token.write_text(OPERATOR_TOKEN)
    key_file = tmp_path / "ca" / "device-token.key"
    key_file.parent.mkdir()
    device_key = create_device_key(key_file)
    (tmp_path / "broker").mkdir()
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    captures = tmp_path / "fleet-captures"
    server = FleetServer(["fleet", "serve", "--broker", broker.url, "--db", f"sqlite:///{tmp_path}/fleet.db",
                          "--http", f"127.0.0.1:{port}", "--fleet", FLEET, "--bundles", str(folder),
                          "--token-file", str(token), "--captures", str(captures),
                          "--device-key-file", str(key_file)], tmp_path / "server.log", port)
    # The capturing device reaches the fleet through a link whose first answer is cut after one byte: the
    # server stored that batch, the device never heard so, and sends the same records again.
    proxy = CuttingProxy(port, cut_after=1, cuts=1)
    roots = {name: tmp_path / name for name in ("dev-cap", "dev-off")}
    for name, root in roots.items():
        (root / "bundles").mkdir(parents=True)
        shutil.copy2(bundle, root / "bundles" / bundle.name)
        (root / "upload.token").write_text(device_token(device_key, name))
    configs = {"dev-cap": _capture_config(roots["dev-cap"], f"http://127.0.0.1:{proxy.port}",
                                          roots["dev-cap"] / "upload.token"),
               # Everything a capturing device has, except `enabled`: the default (off) must hold.
               "dev-off": _capture_config(roots["dev-off"], base, roots["dev-off"] / "upload.token")
               .replace("enabled = true\n", "")}

    def start_agent(name: str) -> AgentProcess:
        root = roots[name]
        return AgentProcess(root, "--bundle", str(root / "bundles"), "--broker", broker.url, "--device-id", name,
                            "--fleet", FLEET, "--spool", str(root / "spool.db"), "--window-seconds", "2",
                            config=configs[name])

    sent: dict[tuple[str, int], np.ndarray] = {}  # (request id, row) -> input, as posted
    labels_sent: dict[tuple[str, int], str] = {}

    def feed(agent: AgentProcess, seed: int, *, label: bool) -> None:
        x = digits_like_inputs(8, seed=seed)
        answer = agent.post("/predict", {"inputs": x.tolist(), "request_id": f"req-{seed}"})
        request_id = str(answer["request_id"])
        assert request_id == f"req-{seed}"
        for row in range(len(x)):
            sent[(request_id, row)] = x[row]
        if label:
            truth = [str((seed + row) % 10) for row in range(len(x))]
            agent.post("/labels", {"labels": truth, "request_id": request_id})
            labels_sent.update({(request_id, row): truth[row] for row in range(len(x))})

    agents: dict[str, AgentProcess] = {}
    try:
        agents = {name: start_agent(name) for name in roots}
        # The fleet server is not up yet: the device captures and keeps its records.
        for seed in range(3):
            feed(agents["dev-cap"], seed, label=seed != 2)
            agents["dev-off"].post("/predict", {"inputs": digits_like_inputs(8, seed=50 + seed).tolist()})
        wait_until(lambda: agents["dev-cap"].status()["capture"]["pending_records"] == 24, 20, "24 captures pending")
        agents["dev-cap"].kill9()  # no goodbye: what it captured must already be on disk
        agents["dev-cap"] = start_agent("dev-cap")
        assert agents["dev-cap"].status()["capture"]["pending_records"] == 24
        server.start()
        wait_until(lambda: _held(base).get("dev-cap") == (24, 16), 60, "the 24 captures stored at the fleet")
        assert proxy.cut == 1  # the cut answer happened, and the resend did not double anything

        server.kill()  # kill -9 the fleet server: what it acknowledged must stay
        feed(agents["dev-cap"], 3, label=True)  # captured while the fleet is down
        server.start()
        wait_until(lambda: _held(base).get("dev-cap") == (32, 24), 60, "32 captures after the fleet restart")

        # The fleet asks both devices for more; only the capturing one may act on it.
        for name in roots:
            r = run_cli("edge_kit", "fleet", "capture-request", name, "--samples", "5", "--server", base,
                        "--token-file", str(token), "--json", timeout=60)
            assert r.returncode == 0, r.stderr
        wait_until(lambda: agents["dev-cap"].status()["capture"]["requests_honoured"] == 1, 30,
                   "the capture request reached dev-cap")
        agents["dev-off"].post("/predict", {"inputs": digits_like_inputs(8, seed=99).tolist()})
        feed(agents["dev-cap"], 4, label=True)
        wait_until(lambda: _held(base).get("dev-cap") == (40, 32), 60, "40 captures")
        wait_until(lambda: agents["dev-cap"].status()["capture"]["pending_records"] == 0, 30, "an empty spool")
        assert "dev-off" not in _held(base)
        assert "capture" not in agents["dev-off"].status()

        out = tmp_path / "export"
        r = run_cli("edge_kit", "fleet", "captures", "export", "--server", base, "--token-file", str(token),
                    "--out", str(out), "--json", timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        for agent in agents.values():
            agent.stop()
        server.kill()
        proxy.close()
        broker.stop()

    # Exactly once, byte for byte: every posted row once, under its own request id, with its label.
    shards = sorted(out.glob("captures-*.npz"))
    assert shards
    rows: dict[tuple[str, int], tuple[np.ndarray, str]] = {}
    ids: list[str] = []
    for shard in shards:
        with np.load(shard, allow_pickle=False) as z:
            names = [str(v) for v in z["labels"]]
            for i in range(len(z["id"])):
                assert str(z["device"][i]) == "dev-cap"
                key = (str(z["request_id"][i]), int(z["row"][i]))
                rows[key] = (z["X"][i], names[int(z["y"][i])] if int(z["y"][i]) >= 0 else "")
                ids.append(str(z["id"][i]))
    assert len(ids) == len(set(ids)) == len(sent) == 40
    assert set(rows) == set(sent)
    for key, x in sent.items():
        np.testing.assert_array_equal(rows[key][0], x)
        assert rows[key][1] == labels_sent.get(key, "")
    # dev-off: enabled was never set, so no capture store was made on it and it sent nothing.
    assert not (roots["dev-off"] / "capture").exists()
