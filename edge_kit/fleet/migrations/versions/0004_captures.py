"""Field captures: the index of the records devices uploaded, and the operators' capture requests.

`captures` holds one row per captured record, keyed by the id the device gave it (a replayed upload
finds its ids taken: exactly once), naming the shard file in the capture store that holds its input
and its position there; the label may be updated later (`label_source` says by whom).
`capture_requests` holds every request for more samples sent to a device; the newest per device is what
its retained `capture` topic says.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def _text(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _double(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "captures", sa.Column("id", sa.Text(), primary_key=True), _text("device"), _text("model_sha256"),
        _text("model_version"), _double("window_start"), _double("created"), _text("request_id", True),
        sa.Column("row_index", sa.BigInteger(), nullable=False), sa.Column("predicted", sa.Integer(), nullable=False),
        _text("label", True), _text("label_source", True), _text("shard"),
        sa.Column("position", sa.Integer(), nullable=False), sa.Column("bytes", sa.BigInteger(), nullable=False),
        _double("stored_at"))
    op.create_index("captures_by_stored", "captures", ["stored_at", "id"])
    op.create_index("captures_by_device", "captures", ["device", "model_sha256"])
    op.create_table(
        "capture_requests", sa.Column("id", sa.Text(), primary_key=True), _text("fleet"), _text("device"),
        sa.Column("samples", sa.BigInteger(), nullable=False), _text("reason"), _double("created"))
    op.create_index("capture_requests_by_device", "capture_requests", ["fleet", "device", "created"])


def downgrade() -> None:
    op.drop_index("capture_requests_by_device", "capture_requests")
    op.drop_table("capture_requests")
    op.drop_index("captures_by_device", "captures")
    op.drop_index("captures_by_stored", "captures")
    op.drop_table("captures")
