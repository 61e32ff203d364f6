"""`edge-agent verify|predict|run` as a user runs them: exit codes, --json, files, config, imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import load_model
from device_agent.batch import predict_file
from device_agent.cli import build_parser
from device_agent.errors import ConfigError, DataError
from device_agent.settings import apply_flags, load_settings
from harness.bundles import digits_like_inputs
from harness.processes import cli_env

FORBIDDEN = ("torch", "mlflow", "dvc", "scipy", "sklearn", "edge_kit", "calibration", "neural_compressor", "onnx")


def test_the_agent_imports_nothing_from_the_server_side() -> None:
    code = (
        "import sys, runpy\n"
        "import device_agent.agent, device_agent.cli, device_agent.http.server, device_agent.batch\n"
        "import device_agent.uplink.transport, device_agent.settings, device_agent.bundle.watcher\n"
        "import device_agent.uplink.wire\n"
        "import device_agent.cli_runner, device_agent.uplink.connection\n"
        "sys.argv = ['edge-agent', '--help']\n"
        "try:\n    runpy.run_module('device_agent', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print('FORBIDDEN', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: edge-agent" in proc.stdout
    assert "FORBIDDEN []" in proc.stdout


def test_verify_ok_and_tampered(edge_agent_cli, bundle_v1: Path, keypair, tmp_path: Path) -> None:
    ok = edge_agent_cli("verify", str(bundle_v1), "--pubkey", str(keypair[1]), "--json")
    assert ok.returncode == 0, ok.stderr
    doc = ok.json()
    assert doc["ok"] and doc["member"] is None and doc["signed"] and doc["selftest"]["ran"]

    tampered = tmp_path / "t.edgebundle"
    with zipfile.ZipFile(bundle_v1) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, data[::-1] if info.filename == "model.onnx" else data)
    bad = edge_agent_cli("verify", str(tampered), "--json")
    assert bad.returncode == 4
    assert bad.json() == {"ok": False, "error": bad.json()["error"], "exit_code": 4, "member": "model.onnx"}
    assert bad.stderr.strip().count("\n") == 0 and "model.onnx" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("fmt", ["npy", "npz", "csv"])
def test_predict_file_streams_every_format_to_the_same_outputs(bundle_v1: Path, tmp_path: Path, fmt: str) -> None:
    x = digits_like_inputs(203, seed=4)
    src = tmp_path / f"in.{fmt}"
    if fmt == "npy":
        np.save(src, x)
    elif fmt == "npz":
        np.savez(src, inputs=x, labels=np.zeros(203))
    else:
        header = ",".join(f"p{i}" for i in range(64))
        np.savetxt(src, x.reshape(203, 64), delimiter=",", header=header, comments="", fmt="%.6g")
    runtime = load_model(bundle_v1).runtime
    out = tmp_path / "out.npy"
    result = predict_file(runtime, src, out, batch_size=50)
    assert result["rows"] == 203
    np.testing.assert_allclose(np.load(out), runtime.run(runtime.as_batch(x)), rtol=1e-4, atol=1e-5)


def test_predict_cli_and_its_bad_inputs(edge_agent_cli, bundle_v1: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", digits_like_inputs(10))
    res = edge_agent_cli("predict", "--bundle", str(bundle_v1), "--input", str(tmp_path / "x.npy"),
                         "--output", str(tmp_path / "y.npy"), "--batch-size", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert res.json()["rows"] == 10 and np.load(tmp_path / "y.npy").shape == (10, 10)

    np.save(tmp_path / "wrong.npy", np.ones((5, 3)))
    res = edge_agent_cli("predict", "--bundle", str(bundle_v1), "--input", str(tmp_path / "wrong.npy"),
                         "--output", str(tmp_path / "z.npy"))
    assert res.returncode == 2 and "does not fit" in res.stderr
    assert not (tmp_path / "z.npy").exists() and not list(tmp_path.glob(".z.npy*"))  # no half-written output

    (tmp_path / "bad.csv").write_text("a,b\n1,2\nx,y\n")
    with pytest.raises(DataError, match=r"bad\.csv:3"):
        predict_file(load_model(bundle_v1).runtime, tmp_path / "bad.csv", tmp_path / "o.npy")
    res = edge_agent_cli("predict", "--bundle", str(bundle_v1), "--input", str(tmp_path / "x.txt"),
                         "--output", str(tmp_path / "o.npy"))
    assert res.returncode == 2


def test_settings_from_toml_and_flags(tmp_path: Path, bundle_v1: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[agent]\nbundle = "bundles"\ndevice_id = "cam-1"\nwindow_seconds = 30\nspool = "state/spool.db"\n'
        '[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\nusername = "u"\npassword_file = "pw"\n'
    )
    (tmp_path / "pw").write_text("s3cret\n")
    settings = load_settings(cfg)
    assert settings.bundle == tmp_path / "bundles" and settings.spool == tmp_path / "state" / "spool.db"
    args = build_parser().parse_args(["run", "--config", str(cfg), "--window-seconds", "5", "--fleet", "plant"])
    merged = apply_flags(settings, args)
    assert (merged.window_seconds, merged.fleet, merged.device_id) == (5.0, "plant", "cam-1")
    broker = merged.broker_config()
    assert (broker.username, broker.password, broker.port) == ("u", "s3cret", 1883)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[agent]\nwindow_secs = 5\n", "agent.window_secs"),
        ("[agent]\nwindow_seconds = -1\n", "agent.window_seconds"),
        ("[agent]\nrequire_signature = 'yes'\n", "agent.require_signature"),
        ("[mqtt]\nkeepalive = 'x'\n", "mqtt.keepalive"),
        ("[other]\n", "other"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.key == key and err.value.exit_code == 2


def test_run_refuses_bad_usage_with_exit_2(edge_agent_cli, bundle_v1: Path, tmp_path: Path) -> None:
    res = edge_agent_cli("run", "--bundle", str(bundle_v1), "--device-id", "d")
    assert res.returncode == 2 and "mqtt.broker" in res.stderr
    res = edge_agent_cli("run", "--bundle", str(bundle_v1), "--device-id", "a/b", "--broker", "mqtt://127.0.0.1:1")
    assert res.returncode == 2 and "topic level" in res.stderr
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[agent]\nbundel = 'x'\n")
    res = edge_agent_cli("run", "--config", str(cfg))
    assert res.returncode == 2 and "agent.bundel" in res.stderr
    copy = tmp_path / "b.edgebundle"
    shutil.copy(bundle_v1, copy)
    res = edge_agent_cli("run", "--bundle", str(copy), "--device-id", "d", "--broker", "mqtt://127.0.0.1:1",
                         "--pubkey", str(tmp_path / "missing.pub"), "--spool", str(tmp_path / "s.db"))
    assert res.returncode == 2 and "public key not found" in res.stderr


def test_the_shipped_example_config_is_valid() -> None:
    settings = load_settings(Path(__file__).resolve().parents[2] / "deploy" / "agent.toml")
    assert settings.require_signature and settings.mqtt.broker and settings.mqtt.broker.startswith("mqtts://")
    assert settings.spool == Path("/var/lib/edge-agent/spool.db")
    unit = (Path(__file__).resolve().parents[2] / "deploy" / "edge-agent.service").read_text()
    assert "StateDirectory=edge-agent" in unit and "edge-agent run --config /etc/edge-agent/agent.toml" in unit


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_predict_memory_stays_flat_on_a_large_file(bundle_v1: Path, tmp_path: Path, fmt: str) -> None:
    rows = 250_000  # 64 MB of float32 inputs
    x = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(rows, 1, 8, 8))
    for i in range(0, rows, 50_000):
        x[i : i + 50_000] = digits_like_inputs(50_000, seed=i)
    x.flush()
    del x
    src = tmp_path / "big.npy"
    if fmt == "npz":
        with zipfile.ZipFile(tmp_path / "big.npz", "w") as zf:  # np.savez layout, written without loading
            zf.write(src, "inputs.npy")
        src = tmp_path / "big.npz"
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from device_agent.agent import load_model\n"
        "from device_agent.batch import predict_file\n"
        f"runtime = load_model({str(bundle_v1)!r}).runtime\n"
        "runtime.run(runtime.as_batch(__import__('numpy').zeros((2048, 64))))  # warm allocations\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"predict_file(runtime, Path({str(src)!r}), Path({str(tmp_path / 'out.npy')!r}), batch_size=2048)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(before, after)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before_kib, after_kib = map(int, proc.stdout.split())
    assert (after_kib - before_kib) < 16 * 1024, f"peak RSS grew by {(after_kib - before_kib) / 1024:.0f} MB"
    print(f"peak RSS growth {(after_kib - before_kib) / 1024:.1f} MB for a 64 MB input")
    out = np.load(tmp_path / "out.npy", mmap_mode="r")
    assert out.shape == (rows, 10) and np.isfinite(out[-1000:]).all()
