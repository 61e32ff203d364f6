"""End to end: from the first shifted inference on a device to the fleet server's alert, in windows and seconds.

Runs the fleet demo headless (real build, Mosquitto, `edge-kit fleet serve`, six `edge-agent` processes,
three of them fed gradually shifted digits) and reads its summary.

    python benchmarks/bench_e2e.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import print_table, write_result

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a shorter run (45 s instead of 90 s)")
    args = p.parse_args()
    duration = 45 if args.quick else 90
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "edge_kit.demo.fleet", "--headless", "--duration", str(duration), "--json",
             "--workdir", str(Path(tmp) / "demo"), "--http-port", "0"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
        )
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return proc.returncode
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [{"device": d["device"], "shift": d["shift"], "flagged": d["flagged"],
             "detection_s": d["detection_seconds"], "detection_windows": d["detection_windows"],
             "windows_closed": d["windows_closed"], "windows_stored": d["windows_stored"],
             "windows_lost": d["windows_lost"]} for d in summary["devices"]]
    print_table(rows)
    shifted = [d for d in summary["devices"] if d["shift"] != "none"]
    detections = [d["detection_seconds"] for d in shifted if d["detection_seconds"] is not None]
    figures = {
        "window_seconds": summary["window_seconds"],
        "run_seconds": summary["duration_s"],
        "devices": len(summary["devices"]),
        "shifted_devices": len(shifted),
        "shifted_detected": len(detections),
        "false_alarms": len(set(summary["flagged"]) - set(summary["shifted"])),
        "detection_seconds_max": max(detections) if detections else None,
        "detection_windows_max": max(detections) / summary["window_seconds"] if detections else None,
        "windows_closed": summary["windows_closed"],
        "windows_lost": summary["windows_lost"],
    }
    write_result("bench_e2e", figures, rows=rows,
                 description="Time from a device's first shifted inference to its drift alert (fleet demo, "
                             "shifts ramped in over 2 windows; alert rule: 2 of the last 3 windows).")
    return 0 if len(detections) == len(shifted) and figures["false_alarms"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
