"""The fleet database schema as Alembic migrations: one file per schema version under `versions/`.

`Storage` calls `upgrade` on every start, so a database written by an older edge-kit is brought to
the current schema (its data kept) before anything reads it. The version lives in the table
`fleet_schema_version` (not Alembic's default `alembic_version`, which MLflow uses: a fleet and an
MLflow tracking store may share one PostgreSQL database). A database made before versioning
(edge-kit up to commit 35a2645: the tables, no version table) has exactly the schema of `0001` and is
stamped with it, then upgraded.

Concurrent starts (`fleet serve --workers N`) are serialised: the whole upgrade runs in one
transaction that first takes the database's write lock (SQLite `BEGIN IMMEDIATE`) or an advisory
lock (PostgreSQL), whose DDL is transactional, so a second process finds the work done.

To change the schema, add `versions/NNNN_what.py` with `down_revision` set to the current head
(`head_revision()`), using `alembic.op` and SQLAlchemy types only (no dialect-specific SQL), with a
`downgrade`; add a test that a database of the previous version is upgraded and keeps its data.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

VERSION_TABLE = "fleet_schema_version"
BASELINE = "0001"  # the schema of every database created before versioning
_HERE = Path(__file__).resolve().parent
_PG_LOCK_KEY = 0x6564_6765_6B69  # pg_advisory_xact_lock key: "edgeki", any constant of our own


class SchemaTooNew(RuntimeError):
    """The database was upgraded by a newer edge-kit than this one."""


def _config(connection: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory(str(_HERE)).get_current_head()
    assert head is not None
    return head


def current_revision(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: sa.Engine) -> str:
    """Bring the database behind `engine` to the head revision; returns it.

    Raises SchemaTooNew when the database names a revision this code does not know.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        inspector = sa.inspect(conn)
        cfg = _config(conn)
        current = current_revision(conn)
        if current is None and inspector.has_table("windows"):
            command.stamp(cfg, BASELINE)
        elif current is not None:
            known = {s.revision for s in ScriptDirectory(str(_HERE)).walk_revisions()}
            if current not in known:
                raise SchemaTooNew(f"the database schema is at revision {current}, newer than this edge-kit "
                                   f"knows (head {head_revision()}): run the newer edge-kit, or a fresh database")
        command.upgrade(cfg, "head")
        return head_revision()
