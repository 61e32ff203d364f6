"""Indexes for the lookups the service makes by key: labels by model and time, triggers by alert,
standing alerts by model/scope/kind (each was a full table scan, growing with the fleet's history).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("labels_by_model_time", "labels", ["model_sha256", "received_at"])
    op.create_index("triggers_by_alert", "triggers", ["alert_id"])
    op.create_index("alerts_by_model_scope_kind", "alerts", ["model_sha256", "scope", "kind"])


def downgrade() -> None:
    op.drop_index("alerts_by_model_scope_kind", "alerts")
    op.drop_index("triggers_by_alert", "triggers")
    op.drop_index("labels_by_model_time", "labels")
