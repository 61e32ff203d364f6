"""Run every `benchmarks/bench_*.py`, then gather `results/*.json` into `results/README.md` (`make bench`).

Each script runs in its own process (so one crash or hang does not take the others down) with this
checkout first on PYTHONPATH. A script that fails, times out, writes no result, or is expected but
missing is reported in the README and the exit status, never hidden; its older figures, if any, stay
in the README marked stale.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--timeout S] [--gather-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gather import load_results, render  # noqa: E402  (sibling module of this script)

REPO_ROOT = HERE.parent
# The benchmarks the issues ask for; one missing from the folder is reported as missing.
EXPECTED = ("bench_train", "bench_compile", "bench_agent", "bench_fleet_ingest", "bench_drift", "bench_e2e")
LOG_TAIL_LINES = 3


def discover(bench_dir: Path) -> list[Path]:
    return sorted(bench_dir.glob("bench_*.py"))


def _result_times(results: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in results.glob("*.json")}


def run_script(script: Path, results: Path, logs: Path, *, quick: bool, timeout: float) -> dict[str, Any]:
    """Run one benchmark script; its outcome: ok, failed, timeout or no result (exit 0 but no JSON written).

    `results` lists the result files it wrote (usually `<script name>.json`, but a script may name its
    result otherwise, or write several).
    """
    name = script.stem
    before = _result_times(results)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["EDGEKIT_BENCH_RESULTS"] = str(results)
    log_path = logs / f"{name}.log"
    cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "detail": f"killed after {timeout:.0f} s", "seconds": time.monotonic() - t0,
                    "log": str(log_path)}
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-LOG_TAIL_LINES:]
        return {"status": "failed", "detail": f"exit {proc.returncode}: " + " / ".join(tail), "seconds": seconds,
                "log": str(log_path)}
    written = sorted(n for n, t in _result_times(results).items() if before.get(n) != t)
    if not written:
        return {"status": "no result", "detail": f"exit 0 but no result JSON was written (expected {name}.json)",
                "seconds": seconds, "log": str(log_path)}
    return {"status": "ok", "seconds": seconds, "log": str(log_path), "results": written}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script (smoke run, rough figures)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts (e.g. bench_agent)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a script is killed (default 1800)")
    p.add_argument("--gather-only", action="store_true", help="do not run anything; rebuild README.md from the JSON")
    p.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of <name>.json and README.md")
    p.add_argument("--expected", nargs="*", default=list(EXPECTED), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    results: Path = args.results.resolve()
    logs = results / "tmp"  # ignored by git: full output of each script
    logs.mkdir(parents=True, exist_ok=True)
    scripts = [s for s in discover(args.bench_dir) if not args.only or s.stem in args.only]
    outcomes: dict[str, dict[str, Any]] = {}
    if not args.gather_only:
        wanted = args.only or args.expected
        for name in wanted:
            if not (args.bench_dir / f"{name}.py").exists():
                outcomes[name] = {"status": "missing", "detail": f"no {name}.py in {args.bench_dir.name}/"}
        for script in scripts:
            print(f"== {script.stem}", flush=True)
            outcome = run_script(script, results, logs, quick=args.quick, timeout=args.timeout)
            outcomes[script.stem] = outcome
            print(f"   {outcome['status']} in {outcome.get('seconds', 0):.1f} s"
                  + (f": {outcome['detail']}" if outcome.get("detail") else ""), flush=True)
    readme = results / "README.md"
    readme.write_text(render(outcomes, load_results(results)) + "\n")
    bad = {n: o for n, o in outcomes.items() if o["status"] != "ok"}
    print(f"\n{len(outcomes) - len(bad)} ok, {len(bad)} not ok" + (f" ({', '.join(sorted(bad))})" if bad else "")
          + f"; summary in {readme}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
