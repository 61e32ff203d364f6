"""Deployments: a bundle rolled out to a target set of devices, and each device's part in it.

`deployments` holds one row per rollout (its state, the bundle it installs, the canary settings and
the last canary decision with its figures); `deployment_devices` one row per target device (its role,
the bundle it served before, the action last published to it and the step it last reported). The
rollout state lives here so a restarted `fleet serve` carries on where it stopped.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def _text(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _double(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "deployments", sa.Column("id", sa.Text(), primary_key=True), _text("fleet"), _double("created_at"),
        _double("updated_at"), _text("state"), _text("name"), _text("version"), _text("bundle_sha256"),
        _text("model_sha256", True), sa.Column("size", sa.BigInteger(), nullable=False), _text("url", True),
        _text("source"), sa.Column("canary_n", sa.Integer(), nullable=False),
        sa.Column("canary_windows", sa.Integer(), nullable=False),
        sa.Column("auto_promote", sa.Integer(), nullable=False), sa.Column("seed", sa.BigInteger(), nullable=False),
        _text("decision", True), _text("note", True))
    op.create_index("deployments_by_state", "deployments", ["state"])
    op.create_table(
        "deployment_devices", _text("deployment_id"), _text("device"), _text("role"),
        _text("previous_sha256", True), _text("previous_name", True), _text("previous_version", True),
        _text("previous_model_sha256", True), _text("action", True), _double("published_at", True),
        _text("step", True), _text("reason", True), sa.Column("bytes", sa.BigInteger(), nullable=True),
        _double("step_at", True), sa.Column("served_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("deployment_id", "device"))


def downgrade() -> None:
    op.drop_table("deployment_devices")
    op.drop_index("deployments_by_state", "deployments")
    op.drop_table("deployments")
