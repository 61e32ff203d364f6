"""The schema before versioning (edge-kit up to commit 35a2645), now in dialect-neutral types.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

# BIGSERIAL on PostgreSQL, INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (ids never reused), as before.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _text(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _double(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "windows", _text("device"), _text("model_sha256"), _double("window_start"), _double("window_end"),
        sa.Column("seq", sa.BigInteger(), nullable=False), sa.Column("n", sa.BigInteger(), nullable=False),
        _text("fleet"), _text("model_name"), _text("model_version"), _double("received_at"),
        sa.Column("counts", sa.LargeBinary(), nullable=False), sa.Column("confusion", sa.LargeBinary()),
        sa.PrimaryKeyConstraint("device", "model_sha256", "window_start"))
    op.create_index("windows_by_model_time", "windows", ["model_sha256", "window_start"])
    op.create_table(
        "devices", sa.Column("device", sa.Text(), primary_key=True), _text("fleet"), _text("state"),
        _double("last_seen"), _double("status_at", True), _text("model_sha256", True), _text("model_name", True),
        _text("model_version", True), _text("status", True))
    op.create_table("counters", sa.Column("name", sa.Text(), primary_key=True),
                    sa.Column("value", sa.BigInteger(), nullable=False))
    op.create_table(
        "labels", sa.Column("id", _ID, primary_key=True, autoincrement=True), _text("device"), _text("model_sha256"),
        _double("received_at"), sa.Column("confusion", sa.LargeBinary(), nullable=False), sqlite_autoincrement=True)
    op.create_table(
        "drift_fleet", _text("model_sha256"), _double("bucket_start"), _text("channel"),
        sa.Column("n", sa.BigInteger(), nullable=False), _text("test"), _double("statistic", True),
        _double("p_value", True), _double("effect", True), sa.Column("drifted", sa.Integer(), nullable=False),
        _text("detail"), sa.PrimaryKeyConstraint("model_sha256", "bucket_start", "channel"))
    op.create_table(
        "drift_device", _text("model_sha256"), _text("device"), _double("window_start"),
        sa.Column("n", sa.BigInteger(), nullable=False), _double("p_value", True), _double("q_value", True),
        _double("effect", True), sa.Column("drifted", sa.Integer(), nullable=False), _text("channels"),
        sa.PrimaryKeyConstraint("model_sha256", "device", "window_start"))
    op.create_table("evaluations", sa.Column("model_sha256", sa.Text(), primary_key=True),
                    _double("evaluated_at"), _text("detail"))
    op.create_table(
        "alerts", sa.Column("id", _ID, primary_key=True, autoincrement=True), _double("created_at"),
        _text("model_sha256"), _text("scope"), _text("kind"), _text("state"), _text("summary"), _text("detail"),
        _double("approved_at", True), _text("approved_by", True), sqlite_autoincrement=True)
    op.create_table(
        "triggers", sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.BigInteger(), nullable=False), _double("at"), _text("command"), _text("outcome"),
        sa.Column("returncode", sa.Integer()), _double("finished_at", True), _text("output", True),
        sqlite_autoincrement=True)


def downgrade() -> None:
    for table in ("triggers", "alerts", "evaluations", "drift_device", "drift_fleet", "labels", "counters",
                  "devices", "windows"):
        op.drop_table(table)
