"""Device agent benchmark: what monitoring costs, memory, payload size, cold start. One run, side by side.

    python benchmarks/bench_agent.py [--quick] [--bundle PATH] [--only-overhead | --only-http]

Measured on the same int8 bundle (the real digits bundle from dist/ if present, else a digits-shaped
int8 CNN made here with ONNX Runtime's quantizer):
- throughput at batch 1 and 32: a bare ONNX Runtime session (`session.run` on already preprocessed
  input, same session options), the same plus the `(x - mean) / std` preprocessing every caller must
  do, `Agent.predict` with monitoring off, and `Agent.predict` with summaries on. For a bundle whose
  model standardises inside its graph (`model.preprocessing.in_graph`) both session rows feed raw
  inputs: there is no caller-side preprocessing left. For an older bundle (preprocessing outside the
  model) the agent folds `(raw - mean) / std` into the graph at load (`ModelRuntime.folded`), while
  the `ort_session` row still runs the bundle's own model on inputs preprocessed beforehand (not
  timed): the strictest baseline. The variants run
  interleaved in short rounds (rotating order) for several seconds each, and each figure is total
  time over total calls, so load from other processes hits all of them alike; process CPU time per
  call is reported beside wall time (`--only-overhead` runs just this table);
- the cost of closing a window (flush, encode, compress);
- payload bytes per window (zlib JSON, as sent; plain JSON for reference);
- resident memory of `edge-agent run` while serving HTTP requests and publishing to Mosquitto;
- time from process start to the first answered prediction (`edge-agent run` over HTTP, and the
  Python API in a fresh interpreter);
- the HTTP serving table (needs `wrk`; `--only-http` runs just this): requests/s and p50/p95/p99 at
  batch 1 and 32 with 8 keep-alive connections, one keep-alive connection, and ~500 requests/s
  offered, for the previous ThreadingHTTPServer (from git), the current server (with and without
  orjson) and a minimal uvicorn + Starlette endpoint on the same ORT session (the ceiling); their
  RSS, the peak RSS with 8 clients sending bodies at the 8 MiB limit, and install sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table, write_result  # noqa: E402
from device_agent.agent import Agent, load_model  # noqa: E402
from device_agent.runtime import session_options  # noqa: E402


def find_bundle(tmp: Path, explicit: str | None) -> tuple[Path, str]:
    if explicit:
        return Path(explicit), "given"
    found = sorted((REPO / "dist").glob("digits-*.edgebundle"))
    if found:
        return found[-1], "dist (real digits bundle)"
    from harness.bundles import make_bundle

    return make_bundle(tmp, int8=True), "digits-shaped int8 CNN made by the benchmark"


def raw_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """Raw inputs of the bundle's sample shape: scikit-learn's digits images when they fit (what the
    digits model was trained on, so histograms and payloads look like the field), else digits-range
    noise (0..16)."""
    rng = np.random.default_rng(seed)
    if int(np.prod(shape)) == 64:
        try:
            from sklearn.datasets import load_digits

            images = load_digits().images.astype(np.float32)
            return images[rng.integers(0, len(images), size=n)].reshape((n, *shape))
        except ImportError:
            pass
    return np.clip(rng.gamma(1.2, 4.0, size=(n, *shape)), 0, 16).astype(np.float32)


def per_call_seconds(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def per_call_wall_and_cpu(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (all threads: the monitor's background worker too) per call.
    On a shared machine the CPU time is the steadier of the two: time spent descheduled is not in it."""
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def throughput(bundle: Path, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import onnxruntime as ort

    loaded = load_model(bundle)
    runtime = loaded.runtime
    model_bytes = zipfile.ZipFile(bundle).read("model.onnx")
    session = ort.InferenceSession(model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    agent_on = Agent(loaded, window_seconds=1e9)
    agent_off = Agent(loaded, window_seconds=1e9, monitoring=False)
    mean, std = runtime.mean, runtime.std
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"agent_preprocessing": (
        "in the bundle's graph" if runtime.in_graph else "folded into the graph by the agent" if runtime.folded
        else "numpy, before the session")}
    seconds_per_variant = 1.5 if quick else 6.0
    for batch in (1, 32):
        x = raw_inputs(runtime.sample_shape, batch, seed=batch)
        if runtime.in_graph:
            # The model standardises raw inputs itself: the bare session is fed what the agent is fed,
            # and there is no caller-side preprocessing to add.
            variants: dict[str, Callable[[], Any]] = {
                "ort_session": lambda x=x: session.run(None, {input_name: x}),
                "ort_session+preprocess": lambda x=x: session.run(None, {input_name: x}),
            }
        else:
            pre = ((x - mean) / std).astype(np.float32)
            variants = {
                "ort_session": lambda pre=pre: session.run(None, {input_name: pre}),
                "ort_session+preprocess": lambda x=x: session.run(
                    None, {input_name: ((x - mean) / std).astype(np.float32)}),
            }
        variants |= {
            "agent_monitoring_off": lambda x=x: agent_off.predict(x),
            "agent_summaries_on": lambda x=x: agent_on.predict(x),
        }
        for fn in variants.values():
            per_call_seconds(fn, 50)
        # Short rounds (a few ms per variant), variant order rotating, many rounds: every variant
        # sees the same load from other processes. The figure is total time over total calls, so
        # the monitoring flushes (one per 2048 samples) are counted at their true rate.
        calls = max(8, 256 // batch)
        names = list(variants)
        totals = dict.fromkeys(names, 0.0)
        cpu_totals = dict.fromkeys(names, 0.0)
        per_round: dict[str, list[float]] = {k: [] for k in names}
        done = 0
        t_end = time.perf_counter() + seconds_per_variant * len(names)
        while time.perf_counter() < t_end:
            for name in names[done % len(names):] + names[: done % len(names)]:
                dt, cpu = per_call_wall_and_cpu(variants[name], calls)
                totals[name] += dt
                cpu_totals[name] += cpu
                per_round[name].append(dt)
            done += 1
        per_call = {k: v / done for k, v in totals.items()}
        base, base_pre = per_call["ort_session"], per_call["ort_session+preprocess"]
        cpu_base = cpu_totals["ort_session"]
        for name, sec in per_call.items():
            rows.append({
                "batch": batch, "variant": name, "us_per_call": sec * 1e6, "samples_per_s": batch / sec,
                "vs_ort_session_pct": (sec / base - 1) * 100, "vs_ort+preprocess_pct": (sec / base_pre - 1) * 100,
                "cpu_us_per_call": cpu_totals[name] / done * 1e6,
                "cpu_vs_ort_session_pct": (cpu_totals[name] / cpu_base - 1) * 100,
            })
            figures[f"b{batch}_{name}_cpu_vs_ort_session_pct"] = round((cpu_totals[name] / cpu_base - 1) * 100, 2)
            figures[f"b{batch}_{name}_samples_per_s"] = round(batch / sec, 1)
        on = per_call["agent_summaries_on"]
        figures[f"b{batch}_summaries_overhead_vs_ort_session_pct"] = round((on / base - 1) * 100, 2)
        figures[f"b{batch}_summaries_overhead_vs_ort_plus_preprocess_pct"] = round((on / base_pre - 1) * 100, 2)
        figures[f"b{batch}_monitoring_cost_vs_agent_off_pct"] = round(
            (on / per_call["agent_monitoring_off"] - 1) * 100, 2)
        # Spread: the same ratio per round (quartiles); rounds without a flush sit at the low end.
        ratios = np.array(per_round["agent_summaries_on"]) / np.array(per_round["ort_session"])
        q1, q3 = np.percentile((ratios - 1) * 100, [25, 75])
        figures[f"b{batch}_summaries_overhead_vs_ort_session_round_iqr_pct"] = [round(q1, 1), round(q3, 1)]
        figures[f"b{batch}_rounds"] = done
    return rows, figures


def window_payload(bundle: Path) -> dict[str, Any]:
    loaded = load_model(bundle)
    out: dict[str, Any] = {}
    for n in (100, 1000, 10000):
        agent = Agent(loaded, window_seconds=60)
        x = raw_inputs(loaded.runtime.sample_shape, n, seed=7)
        for i in range(0, n, 32):
            agent.predict(x[i : i + 32])
        t0 = time.perf_counter()
        closed = agent.close_window()
        close_s = time.perf_counter() - t0
        assert closed is not None
        t0 = time.perf_counter()
        compressed, _ = closed.to_bytes(compress=True)
        encode_s = time.perf_counter() - t0
        plain, _ = closed.to_bytes(compress=False)
        out[f"payload_bytes_zlib_n{n}"] = len(compressed)
        out[f"payload_bytes_json_n{n}"] = len(plain)
        out[f"window_close_ms_n{n}"] = round(close_s * 1e3, 3)
        out[f"window_encode_ms_n{n}"] = round(encode_s * 1e3, 3)
    # With ground truth fed back: the confusion matrix rides along.
    agent = Agent(loaded, window_seconds=60)
    result = agent.predict(raw_inputs(loaded.runtime.sample_shape, 500, seed=8))
    agent.feed_labels([int(c) for c in result.classes])
    closed = agent.close_window()
    assert closed is not None
    out["payload_bytes_zlib_n500_with_labels"] = len(closed.to_bytes(compress=True)[0])
    out["channels"] = len(loaded.histogrammer.names)
    out["bins_max"] = loaded.histogrammer.max_bins
    return out


def _post(url: str, body: bytes, timeout: float = 5.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def serving_process(bundle: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """RSS of `edge-agent run` under HTTP load with a real broker, and start -> first prediction."""
    from harness.processes import MosquittoBroker, cli_env, free_port

    broker_dir = tmp / "broker"
    broker_dir.mkdir()
    broker = MosquittoBroker(broker_dir, extra_config="user root" if os.geteuid() == 0 else "")
    broker.start()
    out: dict[str, Any] = {}
    x1 = json.dumps({"inputs": raw_inputs(load_model(bundle).runtime.sample_shape, 1).tolist()}).encode()
    starts = []
    try:
        for attempt in range(2 if quick else 3):
            port = free_port()
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run", "--bundle", str(bundle), "--broker", broker.url,
                 "--device-id", f"bench-{attempt}", "--spool", str(tmp / f"spool-{attempt}.db"),
                 "--http", f"127.0.0.1:{port}", "--window-seconds", "1", "-q"],
                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                while True:
                    try:
                        _post(f"http://127.0.0.1:{port}/predict", x1, timeout=1)
                        break
                    except OSError:
                        if proc.poll() is not None or time.perf_counter() - t0 > 30:
                            raise RuntimeError("edge-agent did not start") from None
                        time.sleep(0.005)
                starts.append(time.perf_counter() - t0)
                if attempt == 0:
                    xb = json.dumps({"inputs": raw_inputs(load_model(bundle).runtime.sample_shape, 32).tolist()})
                    n_requests = 300 if quick else 2000
                    t1 = time.perf_counter()
                    for i in range(n_requests):
                        _post(f"http://127.0.0.1:{port}/predict", xb.encode() if i % 2 else x1)
                    http_s = time.perf_counter() - t1
                    time.sleep(1.5)  # let a window close and publish
                    mem = _rss_kib(proc.pid)
                    out["serving_rss_mb"] = round(mem["VmRSS"] / 1024, 1)
                    out["serving_peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
                    out["http_requests_per_s_mixed_b1_b32"] = round(n_requests / http_s, 1)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
    finally:
        broker.stop()
    out["run_start_to_first_http_prediction_s"] = round(statistics.median(starts), 3)

    code = (
        "import time; t0 = time.perf_counter()\n"
        "import numpy as np\n"
        "from device_agent.agent import Agent\n"
        f"a = Agent({str(bundle)!r})\n"
        "a.predict(np.zeros((1, *a.model.runtime.sample_shape), dtype=np.float32))\n"
        "print(time.perf_counter() - t0)\n"
    )
    walls, inside = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - t0)
        inside.append(float(res.stdout.strip().splitlines()[-1]))
    out["python_api_process_start_to_first_prediction_s"] = round(statistics.median(walls), 3)
    out["python_api_import_load_verify_selftest_predict_s"] = round(statistics.median(inside), 3)
    return out


# -- HTTP serving: the previous server, the current one, and a uvicorn + Starlette ceiling ------------

# The last commit with the ThreadingHTTPServer front end: the "old" column is that file, unchanged.
OLD_SERVER_COMMIT = "35a2645"
SERVERS = ("old", "new", "new_stdlib_json", "starlette")  # new_stdlib_json: a base install, without orjson
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "socket_errors": %d, "non_2xx": %d, '
    .. '"p50_us": %d, "p95_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def _serve(kind: str, bundle: Path, port: int) -> None:
    """`--serve KIND`: run one server in this process until killed (the benchmark's child process)."""
    logging.basicConfig(level=logging.WARNING)
    if kind == "new_stdlib_json":
        import importlib

        sys.modules["orjson"] = None  # type: ignore[assignment]  # import fails: device_agent.http.jsonio falls back
        import device_agent.http.jsonio as jsonio

        if importlib.reload(jsonio).orjson is not None:
            raise RuntimeError("orjson still in use")
    if kind == "starlette":
        _serve_starlette(bundle, port)
        return
    if kind == "old":
        old = Path(tempfile.mkdtemp(prefix="bench-old-server-")) / "old_http_server.py"
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_SERVER_COMMIT}:device_agent/http/server.py"],
                                capture_output=True, text=True, check=True).stdout
        old.write_text(source)
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_http_server", old)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        server = module.AgentHTTPServer(("127.0.0.1", port), Agent(bundle, window_seconds=1e9))
    else:  # new, new_stdlib_json
        from device_agent.http.server import AgentHTTPServer

        server = AgentHTTPServer(("127.0.0.1", port), Agent(bundle, window_seconds=1e9))
    server.start()
    print("serving", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def _serve_starlette(bundle: Path, port: int) -> None:
    """The ceiling of Python serving: one Starlette route calling the same ORT session, no checks, no monitoring."""
    import onnxruntime as ort
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    runtime = load_model(bundle).runtime
    model_bytes = zipfile.ZipFile(bundle).read("model.onnx")
    session = ort.InferenceSession(model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    input_name, shape = session.get_inputs()[0].name, runtime.sample_shape
    mean, std = runtime.mean, runtime.std

    async def predict(request: Request) -> Response:
        x = np.asarray(orjson.loads(await request.body())["inputs"], dtype=np.float32).reshape((-1, *shape))
        logits = session.run(None, {input_name: ((x - mean) / std).astype(np.float32)})[0]
        return Response(orjson.dumps({"outputs": logits}, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _wrk(url: str, body_path: Path, *, seconds: int, connections: int, delay_ms: int = 0) -> dict[str, Any]:
    script = body_path.with_suffix(f".{delay_ms}.lua")
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"',
             f'local f = io.open("{body_path}"); wrk.body = f:read("*a"); f:close()']
    if delay_ms:  # closed loop with think time: each connection waits delay_ms between requests
        lines.append(f"delay = function() return {delay_ms} end")
    script.write_text("\n".join(lines) + WRK_DONE)
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                          "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout} {out.stderr}")
    r = json.loads(line.removeprefix("WRKJSON "))
    return {"requests_per_s": round(r["requests"] / (r["duration_us"] / 1e6), 1),
            "p50_ms": r["p50_us"] / 1e3, "p95_ms": r["p95_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
            "errors": r["socket_errors"] + r["non_2xx"]}


def _install_mb(dists: tuple[str, ...]) -> float:
    from importlib import metadata

    total = 0
    for name in dists:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            continue
        paths = [Path(str(f.locate())) for f in files]
        total += sum(p.stat().st_size for p in paths if p.is_file())
    return round(total / 1e6, 1)


def body_limit_rss(bundle: Path, quick: bool) -> dict[str, Any]:
    """Peak RSS of the agent's HTTP server while 8 clients send bodies at the default 8 MiB limit.

    Half the requests are JSON with 4096 samples whose numbers are written long enough to fill
    8 MiB (parsed, then run), half are 8 MiB .npy bodies (32,768 samples: read and decoded, then
    refused by the sample cap). The aim: under 150 MB."""
    import http.client
    import io
    import threading

    from device_agent.http.protocol import HttpLimits
    from harness.processes import free_port, wait_for_port

    limit = HttpLimits().max_body_bytes
    shape = load_model(bundle).runtime.sample_shape
    x = raw_inputs(shape, 4096, seed=3)
    per_value = (limit - 2 * len(x) - 64) // x.size - 2  # JSON just under the limit
    json_body = ("{\"inputs\": [" + ",".join(
        "[" + ",".join(f"{v:.{per_value}f}"[:per_value + 1] for v in row) + "]" for row in x.reshape(len(x), -1))
        + "]}").encode()
    buf = io.BytesIO()
    np.save(buf, raw_inputs(shape, (limit - 128) // (4 * int(np.prod(shape))), seed=4))
    npy_body = buf.getvalue()
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", "new", "--bundle", str(bundle),
                             "--port", str(port)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    statuses: list[int] = []
    try:
        wait_for_port(port, timeout=60)
        idle = _rss_kib(proc.pid)["VmRSS"]

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for k in range(2 if quick else 4):
                body, ctype = (json_body, "application/json") if (i + k) % 2 else (npy_body, "application/x-npy")
                try:
                    conn.request("POST", "/predict", body, {"Content-Type": ctype})
                    resp = conn.getresponse()
                    resp.read()
                    statuses.append(resp.status)
                    keep = resp.getheader("Connection") != "close"
                except OSError:  # refused mid-body (503: the body budget is taken), the server closed
                    statuses.append(0)
                    keep = False
                if not keep:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mem = _rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    return {"body_limit_json_bytes": len(json_body), "body_limit_npy_bytes": len(npy_body),
            "body_limit_statuses": {str(k) if k else "reset": statuses.count(k) for k in sorted(set(statuses))},
            "body_limit_idle_rss_mb": round(idle / 1024, 1), "body_limit_peak_rss_mb": round(mem["VmHWM"] / 1024, 1)}


AGENT_DISTS = ("numpy", "onnxruntime", "paho-mqtt", "cryptography", "cffi", "pycparser", "protobuf", "flatbuffers",
               "coloredlogs", "humanfriendly", "packaging", "sympy", "mpmath")
ASGI_DISTS = ("uvicorn", "starlette", "h11", "anyio", "click", "sniffio", "idna", "typing_extensions")


def serving_table(bundle: Path, tmp: Path, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """wrk against the three servers, same bundle and bodies, in one run (skipped when wrk is missing).

    All three run at once (an idle one costs nothing) and are measured in short runs that rotate
    through them, load by load, several rounds: on a shared machine the load from other processes
    then falls on all of them alike. requests/s is total requests over total time; latency
    percentiles are the median over rounds of each run's percentile."""
    import shutil

    from harness.processes import free_port, wait_for_port

    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install -y wrk): serving table skipped")
        return [], {}
    seconds, rounds = (2, 2) if quick else (3, 4)
    shape = load_model(bundle).runtime.sample_shape
    bodies = {}
    for batch in (1, 32):
        bodies[batch] = tmp / f"body{batch}.json"
        bodies[batch].write_text(json.dumps({"inputs": raw_inputs(shape, batch, seed=batch).tolist()}))
    loads = [("b1 c8", bodies[1], 8, 0), ("b32 c8", bodies[32], 8, 0), ("b1 c1", bodies[1], 1, 0),
             ("b1 ~500/s", bodies[1], 10, 18)]  # 10 connections, 18 ms think time: ~500 requests/s
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for kind in SERVERS:
            port = free_port()
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--bundle",
                                     str(bundle), "--port", str(port)], env={**os.environ, "PYTHONPATH": str(REPO)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs[kind] = (proc, f"http://127.0.0.1:{port}/predict")
            wait_for_port(port, timeout=60)
        for _, url in procs.values():
            _wrk(url, bodies[1], seconds=1, connections=8)  # warm-up
        for r in range(rounds):
            for label, body, conns, delay in loads:
                for kind in SERVERS[r % len(SERVERS):] + SERVERS[: r % len(SERVERS)]:
                    run = _wrk(procs[kind][1], body, seconds=seconds, connections=conns, delay_ms=delay)
                    results.setdefault((kind, label), []).append(run)
        figures: dict[str, Any] = {}
        for kind, (proc, _) in procs.items():
            mem = _rss_kib(proc.pid)
            figures[f"http_{kind}_rss_mb"] = round(mem["VmRSS"] / 1024, 1)
            figures[f"http_{kind}_peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows: list[dict[str, Any]] = []
    for label, *_ in loads:
        for kind in SERVERS:
            runs = results[(kind, label)]
            row = {"server": kind, "load": label,
                   "requests_per_s": round(statistics.mean(x["requests_per_s"] for x in runs), 1),
                   **{p: round(statistics.median(x[p] for x in runs), 2) for p in ("p50_ms", "p95_ms", "p99_ms")},
                   "errors": sum(x["errors"] for x in runs)}
            rows.append(row)
            key = label.replace(" ", "_").replace("~", "").replace("/", "per")
            figures[f"http_{kind}_{key}_requests_per_s"] = row["requests_per_s"]
            figures[f"http_{kind}_{key}_p99_ms"] = row["p99_ms"]
    figures.update(body_limit_rss(bundle, quick))
    figures["install_mb_agent_base"] = _install_mb(AGENT_DISTS)
    figures["install_mb_new_server_adds"] = 0.0  # standard library only
    figures["install_mb_uvicorn_starlette_would_add"] = _install_mb(ASGI_DISTS)
    return rows, figures

def overhead_only(args: argparse.Namespace) -> None:
    """The first table alone: Agent.predict (monitoring off, summaries on) against a bare session."""
    from device_agent.host import host_info

    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp_dir:
        bundle, source = find_bundle(Path(tmp_dir), args.bundle)
        load_before = os.getloadavg()
        rows, figures = throughput(bundle, args.quick)
    machine = host_info()
    print(f"bundle: {source}; machine: {machine.get('cpu')}, {machine.get('int8_isa')}; "
          f"load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; "
          f"agent preprocessing: {figures['agent_preprocessing']}")
    print_table(rows)
    name = "agent_overhead" if args.name == "agent" else args.name
    path = write_result(
        name, figures, rows=rows, bundle_source=source, quick=args.quick,
        load_average_1_5_15=[round(v, 2) for v in os.getloadavg()],
        conditions="variants interleaved in short rotating rounds, total time / total calls; ORT: 1 intra-op thread",
    )
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    parser.add_argument("--bundle", help="bundle to measure (default: dist/digits-*.edgebundle or a generated one)")
    parser.add_argument("--skip-serving", action="store_true",
                        help="skip the edge-agent process figures (RSS, cold start), e.g. where Mosquitto is missing")
    parser.add_argument("--name", default="agent", help="result name (benchmarks/results/NAME.json)")
    parser.add_argument("--only-http", action="store_true", help="only the HTTP serving table")
    parser.add_argument("--only-overhead", action="store_true",
                        help="only the Agent.predict vs bare session table (result name agent_overhead)")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # child process of the serving table
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, Path(args.bundle), args.port)
        return
    logging.basicConfig(level=logging.WARNING)
    if args.only_overhead:
        overhead_only(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp_dir:
        tmp = Path(tmp_dir)
        bundle, source = find_bundle(tmp, args.bundle)
        print(f"bundle: {bundle} ({source})")
        http_rows, http_figures = serving_table(bundle, tmp, args.quick)
        print_table(http_rows)
        rows: list[dict[str, Any]] = []
        figures: dict[str, Any] = {}
        payload: dict[str, Any] = {}
        serving: dict[str, Any] = {}
        if not args.only_http:
            rows, figures = throughput(bundle, args.quick)
            print_table(rows)
            payload = window_payload(bundle)
            serving = {} if args.skip_serving else serving_process(bundle, tmp, args.quick)
    figures.update(http_figures)
    figures.update(payload)
    figures.update(serving)
    print_table([{"figure": k, "value": v} for k, v in {**payload, **serving}.items()])
    print_table([{"figure": k, "value": v} for k, v in http_figures.items() if k.startswith("install")])
    path = write_result(
        args.name, figures, rows=rows, http_rows=http_rows, bundle_source=source,
        conditions=("2-core shared VM with other engineers' jobs running; variants interleaved in short "
                    "rotating rounds, total time / total calls; ORT: 1 intra-op thread (agent default), no spin"),
        quick=args.quick, load_average_1_5_15=[round(v, 2) for v in os.getloadavg()],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
