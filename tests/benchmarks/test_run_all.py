"""`make bench` (benchmarks/run_all.py) over stand-in scripts: results gathered, failures and gaps reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

OK_SCRIPT = '''
import sys
from common import write_result
quick = "--quick" in sys.argv
write_result("{name}", {{"throughput": {{"batch_1": 1234.5, "batch_32": 9876.0}}, "quick": quick}},
             rows=[{{"case": "a", "items_per_s": 1.5}}, {{"case": "b", "items_per_s": 2.5}}])
print("table printed")
'''
FAILING_SCRIPT = 'import sys\nprint("loading model...")\nsys.exit("bench_broken: ONNX file not found")\n'
SILENT_SCRIPT = 'print("forgot to write a result")\n'


def _bench_dir(tmp_path: Path) -> Path:
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    # The stand-ins use the real shared helper, as real benchmark scripts do.
    (bench / "common.py").write_text((REPO_ROOT / "benchmarks" / "common.py").read_text())
    (bench / "bench_good.py").write_text(OK_SCRIPT.format(name="bench_good"))
    (bench / "bench_broken.py").write_text(FAILING_SCRIPT)
    (bench / "bench_silent.py").write_text(SILENT_SCRIPT)
    return bench


def _run_all(bench: Path, results: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "run_all.py"), "--bench-dir", str(bench),
         "--results", str(results), *args],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120,
    )


def test_results_gathered_and_failures_reported(tmp_path: Path) -> None:
    bench, results = _bench_dir(tmp_path), tmp_path / "results"
    proc = _run_all(bench, results, "--quick", "--expected", "bench_good", "bench_absent")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 ok, 3 not ok (bench_absent, bench_broken, bench_silent)" in proc.stdout

    doc = json.loads((results / "bench_good.json").read_text())
    assert doc["figures"]["quick"] is True and doc["machine"]["cpu"]
    readme = (results / "README.md").read_text()
    assert "| bench_good | ok | bench_good |" in readme
    assert "| bench_absent | missing: no bench_absent.py in benchmarks/ |" in readme
    assert "| bench_broken | failed: exit 1: loading model... / bench_broken: ONNX file not found |" in readme
    assert "| bench_silent | no result: exit 0 but no result JSON was written (expected bench_silent.json) |" in readme
    assert "| throughput.batch_1 | 1,234 |" in readme and "| throughput.batch_32 | 9,876 |" in readme
    assert "| case | items_per_s |" in readme and "| b | 2.5 |" in readme
    assert doc["machine"]["cpu"] in readme and doc["machine"]["int8_isa"] in readme
    assert "table printed" in (results / "tmp" / "bench_good.log").read_text()


def test_a_result_named_otherwise_is_attributed_to_its_script(tmp_path: Path) -> None:
    bench, results = _bench_dir(tmp_path), tmp_path / "results"
    (bench / "bench_agent.py").write_text(OK_SCRIPT.format(name="agent"))
    proc = _run_all(bench, results, "--only", "bench_agent")
    assert proc.returncode == 0, proc.stdout
    readme = (results / "README.md").read_text()
    assert "| bench_agent | ok | agent |" in readme and "## agent" in readme and "stale" not in readme


def test_a_failing_rerun_keeps_old_figures_marked_stale(tmp_path: Path) -> None:
    bench, results = _bench_dir(tmp_path), tmp_path / "results"
    assert _run_all(bench, results, "--only", "bench_good").returncode == 0
    (bench / "bench_good.py").write_text(FAILING_SCRIPT)
    proc = _run_all(bench, results, "--only", "bench_good")
    assert proc.returncode == 1
    readme = (results / "README.md").read_text()
    assert "| bench_good | failed:" in readme and "**stale**" in readme and "| throughput.batch_1 | 1,234 |" in readme


def test_a_hanging_script_is_killed_at_the_timeout(tmp_path: Path) -> None:
    bench, results = _bench_dir(tmp_path), tmp_path / "results"
    (bench / "bench_hang.py").write_text("import time\ntime.sleep(60)\n")
    proc = _run_all(bench, results, "--only", "bench_hang", "--timeout", "1")
    assert proc.returncode == 1
    assert "| bench_hang | timeout: killed after 1 s |" in (results / "README.md").read_text()


def test_gather_only_runs_nothing(tmp_path: Path) -> None:
    bench, results = _bench_dir(tmp_path), tmp_path / "results"
    proc = _run_all(bench, results, "--gather-only")
    assert proc.returncode == 0
    assert not (results / "bench_good.json").exists()
    assert (results / "README.md").read_text().startswith("# Benchmark results")
