"""Writes the fleet database fixtures of the schema before versioning (edge-kit at commit 35a2645).

The fixtures are checked in; this script records how they were made. It must be run with the code of
that commit first on the path, e.g. from a `git archive 35a2645` copy:

    PYTHONPATH=/tmp/edge-kit-35a2645 python tests/edge_kit/fleet/data/make_unversioned_db.py OUT.sqlite [PG_URL]

With PG_URL the same rows go to that (empty) PostgreSQL database too; dump it with
`pg_dump --inserts --no-owner --no-privileges` and drop its
psql-only `\\restrict`/`\\unrestrict` lines, so the dump runs through psycopg.
"""

from __future__ import annotations

import sqlite3
import sys

import numpy as np

from edge_kit.fleet.storage import Storage, WindowRow, encode_counts

SHA = "ab" * 32
T0 = 1_700_000_000.0


def fill(storage: Storage) -> None:
    windows = [WindowRow(f"dev{d}", SHA, T0 + 60.0 * w, T0 + 60.0 * (w + 1), w, 100 + d, "test", "digits", "1.0.0",
                         T0 + 60.0 * (w + 1) + 1, encode_counts(np.arange(8, dtype=np.int64) * (d + 1) + w),
                         np.eye(2, dtype=np.int64).tobytes() if d == 0 else None)
               for d in range(3) for w in range(4)]
    statuses = [{"device": "dev1", "fleet": "test", "state": "offline", "at": T0 + 1000.0,
                 "status": {"state": "offline", "reason": "fixture"}}]
    assert storage.ingest(windows, statuses, {"rejected": 2}) == 12
    assert storage.ingest(windows[:1], [], {}) == 0  # a duplicate, counted
    storage.add_labels("dev2", SHA, np.array([[3, 1], [0, 4]], dtype=np.int64).tobytes(), at=T0 + 30.0)
    storage.save_evaluation(SHA, T0 + 500.0, {"cutoff": T0, "bundle": "digits-1.0.0"},
                            [(SHA, T0, "class_0", 300, "chi2", 4.5, 0.03, 0.2, 1, "{}")],
                            [(SHA, "dev0", T0, 100, 0.01, 0.02, 0.3, 1, '["class_0"]')])
    first = storage.create_alert(SHA, "fleet", "data_drift", "open", "class_0 drifted", {"channels": ["class_0"]})
    second = storage.create_alert(SHA, "device:dev0", "data_drift", "retrain_failed", "dev0", {})
    storage.set_alert_state(first, "approved", approved_by="carol")
    trig = storage.add_trigger(first, ["retrain", "--x"], "running", at=T0 + 600.0)
    storage.finish_trigger(trig, "succeeded", 0, "done\n")
    storage.add_trigger(second, ["retrain"], "refused", finished=True, at=T0 + 700.0)


def main() -> None:
    out = sys.argv[1]
    storage = Storage(f"sqlite:///{out}")
    fill(storage)
    storage.close()
    with sqlite3.connect(out) as conn:  # one self-contained file, no -wal beside it
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("VACUUM")
    if len(sys.argv) > 2:
        pg = Storage(sys.argv[2])
        fill(pg)
        pg.close()


if __name__ == "__main__":
    main()
