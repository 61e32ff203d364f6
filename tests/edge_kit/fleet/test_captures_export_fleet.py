"""`edge-kit fleet captures export` against a real `fleet serve` (with Mosquitto), populated through its upload
route with enrolled device tokens; then `edge-kit data add` takes the export into a real git + DVC project."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_kit.cli import main
from edge_kit.fleet.identity import FleetCA
from harness.fleetkit import OPERATOR_TOKEN, digits_model, logits, make_bundle
from harness.processes import MosquittoBroker, cli_env, free_port, wait_for_port
from tests.helpers.projects import make_project

pytestmark = [pytest.mark.integration]


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    (tmp_path / "mqtt").mkdir()
    broker = MosquittoBroker(tmp_path / "mqtt")
    broker.start()
    bundle = make_bundle(tmp_path / "bundles", version="1.0.0")
    ca = FleetCA(tmp_path / "ca")
    tokens = {d: ca.issue(d, tmp_path / "issued" / d).upload_token for d in ("dev-1", "dev-2")}
    operator = tmp_path / "operator.token"
    operator.write_text(OPERATOR_TOKEN + "\n")
    port = free_port()
    log = tmp_path / "fleet.log"
    argv = [sys.executable, "-m", "edge_kit", "fleet", "serve", "--broker", broker.url,
            "--db", f"sqlite:///{tmp_path}/fleet.db", "--http", f"127.0.0.1:{port}", "--fleet", "cap",
            "--bundles", str(tmp_path / "bundles"), "--token-file", str(operator),
            "--device-key-file", str(ca.device_key_path)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=cli_env(), stdout=out, stderr=out, start_new_session=True)
    try:
        try:
            wait_for_port(port, timeout=120)
        except TimeoutError:
            raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
        yield {"url": f"http://127.0.0.1:{port}", "bundle": bundle, "operator": operator,
               "tokens": {d: Path(str(t)).read_text().strip() for d, t in tokens.items()}}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        broker.stop()


def _upload(url: str, device: str, token: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    body = json.dumps({"schema": "edgekit.captures/1", "device": device, "records": records}).encode()
    request = urllib.request.Request(f"{url}/api/captures/upload", data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Edgekit-Device": device, "Authorization": f"Device {token}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        doc: dict[str, Any] = json.loads(answer.read())
        return doc


def _records(sha: str, x: np.ndarray, y: np.ndarray, first: int, labelled: int) -> list[dict[str, Any]]:
    out = logits(x)
    records = []
    for i in range(len(x)):
        n = first + i
        row = np.ascontiguousarray(x[i], dtype="<f4")
        records.append({"id": f"{n:032x}", "created": 1_765_000_000.0 + n, "request_id": f"req-{n // 3}",
                        "row": n % 3, "window_start": 1_765_000_000.0, "model_sha256": sha,
                        "input": {"dtype": "float32", "shape": [1, 8, 8],
                                  "data": base64.b64encode(row.tobytes()).decode()},
                        "output": [float(v) for v in out[i]], "predicted": int(out[i].argmax()),
                        "label": str(int(y[i])) if i < labelled else None})
    return records


def test_export_then_data_add_from_a_real_fleet(fleet: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    *_, x_test, y_test, _, _ = digits_model()
    x, y = x_test[:30].astype(np.float32), y_test[:30]
    sha = fleet["bundle"].sha256
    first = _records(sha, x[:18], y[:18], 0, labelled=12)  # dev-1: 12 labelled, 6 not
    second = _records(sha, x[18:], y[18:], 18, labelled=8)  # dev-2: 8 labelled, 4 not
    assert _upload(fleet["url"], "dev-1", fleet["tokens"]["dev-1"], first)["stored"] == 18
    assert _upload(fleet["url"], "dev-2", fleet["tokens"]["dev-2"], second)["stored"] == 12
    with pytest.raises(urllib.error.HTTPError) as refused:  # dev-1's token does not upload as dev-2
        _upload(fleet["url"], "dev-2", fleet["tokens"]["dev-1"], _records(sha, x[:1], y[:1], 99, 1))
    assert refused.value.code == 401

    # The unlabelled rows of dev-2's last request (req-9: records 27-29, of which 28 and 29 are unlabelled)
    # get labels from a CSV; one CSV label corrects a device label (record 0: request req-0, row 0).
    table = tmp_path / "labels.csv"
    table.write_text(f"request_id,row,label\nreq-9,1,{y[28]}\nreq-9,2,{y[29]}\nreq-0,0,{(y[0] + 1) % 10}\n")
    out = tmp_path / "export"
    argv = ["fleet", "captures", "export", "--server", fleet["url"], "--token-file", str(fleet["operator"]),
            "--out", str(out), "--labelled-only", "--labels-csv", str(table), "--shard-records", "9", "--json"]
    assert main(argv) == 0
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert manifest["records"] == manifest["labelled"] == 22
    assert manifest["counts"]["devices"]["dev-1"] == {"records": 12, "labelled": 12,
                                                      "label_sources": {"device": 11, "csv": 1}}
    assert manifest["counts"]["devices"]["dev-2"] == {"records": 10, "labelled": 10,
                                                      "label_sources": {"device": 8, "csv": 2}}
    assert manifest["model_versions"][sha]["version"] == "1.0.0" and manifest["labels"] == [str(i) for i in range(10)]
    shards = sorted(out.glob("captures-*.npz"))
    assert [p.name for p in shards] == ["captures-00000.npz", "captures-00001.npz", "captures-00002.npz"]
    arrays: dict[str, list[np.ndarray]] = {}
    for path in shards:
        with np.load(path) as npz:
            for k in ("X", "y", "id", "device", "label_source"):
                arrays.setdefault(k, []).append(npz[k])
    got = {k: np.concatenate(v) for k, v in arrays.items()}
    wanted = [*range(12), *range(18, 26), 28, 29]
    assert sorted(int(i, 16) for i in got["id"]) == wanted
    by_id = {int(i, 16): j for j, i in enumerate(got["id"])}
    for n in wanted:
        np.testing.assert_array_equal(got["X"][by_id[n]], x[n])  # the input bytes as the device sent them
        assert got["y"][by_id[n]] == ((y[0] + 1) % 10 if n == 0 else y[n])
    assert got["label_source"][by_id[0]] == "csv" and got["label_source"][by_id[28]] == "csv"

    # The Python entry point pages in small steps and gets the same records.
    from edge_kit.commands.fleet_captures import export

    small = export(fleet["url"], tmp_path / "small", token_file=str(fleet["operator"]), devices=["dev-2"],
                   since="2025-12-06T05:46:40Z", page_limit=4)
    assert small["records"] == 12 and small["labelled"] == 8 and list(small["counts"]["devices"]) == ["dev-2"]

    # A wrong operator token: exit 1 with the server's words, and the previous export stays.
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token-" + "x" * 30)
    assert main(["fleet", "captures", "export", "--server", fleet["url"], "--token-file", str(bad),
                 "--out", str(out)]) == 1
    assert "answered 401" in capsys.readouterr().err
    assert sorted(out.glob("captures-*.npz")) == shards

    # The export becomes the project's field data.
    config = make_project(tmp_path / "proj")
    assert main(["data", "add", str(out), "--config", str(config), "--json"]) == 0
    added = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert added["added"] == 22 and added["devices"] == {"dev-1": 12, "dev-2": 10} and added["committed"]
    assert added["label_sources"] == {"csv": 3, "device": 19}
