"""Deployment rows in the fleet database (the tables of migration 0003), through the fleet's `Database`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from edge_kit.fleet.storage import Storage

# States of a deployment. `canary`: only the canary devices were told; `rolling`: every target was;
# `done`: every target reported the bundle installed; `halted`: no further device is told (devices that
# installed keep it); `rolled_back`: the devices that were told are told to return to their previous bundle.
CANARY, ROLLING, DONE, HALTED, ROLLED_BACK = "canary", "rolling", "done", "halted", "rolled_back"
STATES = (CANARY, ROLLING, DONE, HALTED, ROLLED_BACK)
ACTIVE = (CANARY, ROLLING)
CANARY_ROLE, REST_ROLE = "canary", "rest"

_DEPLOYMENT_COLS = ("id", "fleet", "created_at", "updated_at", "state", "name", "version", "bundle_sha256",
                    "model_sha256", "size", "url", "source", "canary_n", "canary_windows", "auto_promote", "seed",
                    "decision", "note")
_DEVICE_COLS = ("deployment_id", "device", "role", "previous_sha256", "previous_name", "previous_version",
                "previous_model_sha256", "action", "published_at", "step", "reason", "bytes", "step_at",
                "served_bytes")


@dataclass(frozen=True)
class Previous:
    """What a device served before a deployment: where a rollback returns it to."""

    sha256: str | None
    name: str | None
    version: str | None
    model_sha256: str | None


class DeploymentStore:
    """Queries on the deployment tables, through the fleet `Database` (one connection behind a lock)."""

    def __init__(self, storage: Storage) -> None:
        self.database = storage.database

    def _rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.database.read() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params or {})]

    def _write(self, statements: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> list[int]:
        """Statements in one transaction; the number of rows each changed."""
        counts = []
        with self.database.write() as conn:
            for sql, rows in statements:
                if len(rows) == 1:
                    counts.append(conn.execute(sa.text(sql), rows[0]).rowcount)
                elif rows:  # executemany: drivers do not all sum the row counts
                    conn.execute(sa.text(sql), list(rows))
                    counts.append(len(rows))
                else:
                    counts.append(0)
        return counts

    def create(self, row: dict[str, Any], devices: Sequence[tuple[str, str, Previous]]) -> None:
        """One deployment and its target devices (device, role, previous), in one transaction."""
        now = time.time()
        values = {**row, "created_at": now, "updated_at": now, "decision": None, "note": None}
        values["auto_promote"] = int(bool(values["auto_promote"]))
        device_rows = [{"deployment_id": row["id"], "device": device, "role": role, "previous_sha256": p.sha256,
                        "previous_name": p.name, "previous_version": p.version, "previous_model_sha256": p.model_sha256}
                       for device, role, p in devices]
        self._write([
            (f"INSERT INTO deployments ({', '.join(_DEPLOYMENT_COLS)}) "
             f"VALUES ({', '.join(':' + c for c in _DEPLOYMENT_COLS)})", [values]),
            ("INSERT INTO deployment_devices (deployment_id, device, role, previous_sha256, previous_name, "
             "previous_version, previous_model_sha256, served_bytes) VALUES (:deployment_id, :device, :role, "
             ":previous_sha256, :previous_name, :previous_version, :previous_model_sha256, 0)", device_rows),
        ])

    def get(self, deployment_id: str) -> dict[str, Any] | None:
        found = self._deployments("WHERE id = :id", {"id": deployment_id})
        return found[0] if found else None

    def all(self, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if states:
            names = {f"s{i}": s for i, s in enumerate(states)}
            return self._deployments(f"WHERE state IN ({', '.join(':' + k for k in names)})", names)
        return self._deployments("", {})

    def _deployments(self, where: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        rows = self._rows(f"SELECT {', '.join(_DEPLOYMENT_COLS)} FROM deployments {where} "
                          "ORDER BY created_at DESC, id", params)
        out = []
        for r in rows:
            d = dict(zip(_DEPLOYMENT_COLS, r, strict=True))
            d["auto_promote"] = bool(d["auto_promote"])
            d["decision"] = json.loads(d["decision"]) if d["decision"] else None
            out.append(d)
        return out

    def devices(self, deployment_id: str) -> list[dict[str, Any]]:
        rows = self._rows(f"SELECT {', '.join(_DEVICE_COLS)} FROM deployment_devices "
                          "WHERE deployment_id = :id ORDER BY device", {"id": deployment_id})
        return [dict(zip(_DEVICE_COLS, r, strict=True)) for r in rows]

    def set_state(self, deployment_id: str, state: str, *, decision: dict[str, Any] | None = None,
                  note: str | None = None, only_from: Sequence[str] | None = None) -> bool:
        """Move a deployment to `state` (only from one of `only_from`, if given); True when it moved."""
        sets = ["state = :state", "updated_at = :now"]
        params: dict[str, Any] = {"state": state, "now": time.time(), "id": deployment_id}
        if decision is not None:
            sets.append("decision = :decision")
            params["decision"] = json.dumps(decision, allow_nan=False)
        if note is not None:
            sets.append("note = :note")
            params["note"] = note
        sql = f"UPDATE deployments SET {', '.join(sets)} WHERE id = :id"
        if only_from:
            names = {f"f{i}": s for i, s in enumerate(only_from)}
            sql += f" AND state IN ({', '.join(':' + k for k in names)})"
            params.update(names)
        return self._write([(sql, [params])])[0] > 0

    def set_decision(self, deployment_id: str, decision: dict[str, Any]) -> None:
        self._write([("UPDATE deployments SET decision = :d, updated_at = :now WHERE id = :id",
                      [{"d": json.dumps(decision, allow_nan=False), "now": time.time(), "id": deployment_id}])])

    def set_action(self, deployment_id: str, devices: Sequence[str], action: str) -> None:
        """Record what was published to each device (`clear`: the empty payload that clears the topic)."""
        now = time.time()
        self._write([("UPDATE deployment_devices SET action = :action, published_at = :now "
                      "WHERE deployment_id = :id AND device = :device",
                      [{"action": action, "now": now, "id": deployment_id, "device": d} for d in devices])])

    def set_steps(self, deployment_id: str, steps: Sequence[tuple[str, str, str | None, int, float]]) -> None:
        """(device, step, reason, bytes, at) as the devices reported them."""
        self._write([("UPDATE deployment_devices SET step = :step, reason = :reason, bytes = :n, step_at = :at "
                      "WHERE deployment_id = :id AND device = :device",
                      [{"step": step, "reason": reason, "n": n, "at": at, "id": deployment_id, "device": device}
                       for device, step, reason, n, at in steps])])

    def add_served_bytes(self, deployment_id: str, device: str, n: int) -> None:
        self._write([("UPDATE deployment_devices SET served_bytes = served_bytes + :n "
                      "WHERE deployment_id = :id AND device = :device",
                      [{"n": n, "id": deployment_id, "device": device}])])

    def served_bytes(self, deployment_id: str, device: str) -> int | None:
        rows = self._rows("SELECT served_bytes FROM deployment_devices WHERE deployment_id = :id "
                          "AND device = :device", {"id": deployment_id, "device": device})
        return int(rows[0][0] or 0) if rows else None

    def for_bundle(self, bundle_sha256: str) -> list[dict[str, Any]]:
        return self._deployments("WHERE bundle_sha256 = :sha", {"sha": bundle_sha256})

    def published(self, fleet: str) -> list[tuple[str, str, str, float]]:
        """(device, deployment id, action, published at): per device of this fleet, the action most
        recently published to it, i.e. what the retained message on its topic must say."""
        rows = self._rows(
            "SELECT dd.device, dd.deployment_id, dd.action, dd.published_at FROM deployment_devices dd "
            "JOIN deployments d ON d.id = dd.deployment_id WHERE d.fleet = :fleet AND dd.action IS NOT NULL "
            "ORDER BY dd.published_at", {"fleet": fleet})
        latest: dict[str, tuple[str, str, str, float]] = {}
        for device, dep, action, at in rows:
            latest[str(device)] = (str(device), str(dep), str(action), float(at))
        return list(latest.values())
