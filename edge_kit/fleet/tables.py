"""The fleet tables as SQLAlchemy Core objects, for building queries (not for creating the schema).

The schema is made by the Alembic migrations (`edge_kit.fleet.migrations`); these objects describe its
head revision, column for column in the same order (`tests/edge_kit/fleet/test_fleet_storage_migrations.py`
compares them with a migrated database). Rows passed as tuples follow that column order.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


def _text(name: str, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _double(name: str, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, sa.Double(), nullable=nullable)


def _bigint(name: str, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True)


# Summary windows, keyed by the idempotency key (device, model_sha256, window_start).
windows = sa.Table(
    "windows", metadata,
    sa.Column("device", sa.Text(), primary_key=True), sa.Column("model_sha256", sa.Text(), primary_key=True),
    sa.Column("window_start", sa.Double(), primary_key=True), _double("window_end"), _bigint("seq"), _bigint("n"),
    _text("fleet"), _text("model_name"), _text("model_version"), _double("received_at"),
    sa.Column("counts", sa.LargeBinary(), nullable=False), sa.Column("confusion", sa.LargeBinary()))

devices = sa.Table(
    "devices", metadata,
    sa.Column("device", sa.Text(), primary_key=True), _text("fleet"), _text("state"), _double("last_seen"),
    _double("status_at", True), _text("model_sha256", True), _text("model_name", True),
    _text("model_version", True), _text("status", True))

counters = sa.Table("counters", metadata, sa.Column("name", sa.Text(), primary_key=True), _bigint("value"))

labels = sa.Table(
    "labels", metadata, _id(), _text("device"), _text("model_sha256"), _double("received_at"),
    sa.Column("confusion", sa.LargeBinary(), nullable=False))

drift_fleet = sa.Table(
    "drift_fleet", metadata,
    sa.Column("model_sha256", sa.Text(), primary_key=True), sa.Column("bucket_start", sa.Double(), primary_key=True),
    sa.Column("channel", sa.Text(), primary_key=True), _bigint("n"), _text("test"), _double("statistic", True),
    _double("p_value", True), _double("effect", True), sa.Column("drifted", sa.Integer(), nullable=False),
    _text("detail"))

drift_device = sa.Table(
    "drift_device", metadata,
    sa.Column("model_sha256", sa.Text(), primary_key=True), sa.Column("device", sa.Text(), primary_key=True),
    sa.Column("window_start", sa.Double(), primary_key=True), _bigint("n"), _double("p_value", True),
    _double("q_value", True), _double("effect", True), sa.Column("drifted", sa.Integer(), nullable=False),
    _text("channels"))

evaluations = sa.Table(
    "evaluations", metadata, sa.Column("model_sha256", sa.Text(), primary_key=True), _double("evaluated_at"),
    _text("detail"))

alerts = sa.Table(
    "alerts", metadata, _id(), _double("created_at"), _text("model_sha256"), _text("scope"), _text("kind"),
    _text("state"), _text("summary"), _text("detail"), _double("approved_at", True), _text("approved_by", True))

triggers = sa.Table(
    "triggers", metadata, _id(), _bigint("alert_id"), _double("at"), _text("command"), _text("outcome"),
    sa.Column("returncode", sa.Integer()), _double("finished_at", True), _text("output", True))

# Field captures (migration 0004): one row per uploaded record, keyed by its device-made id (exactly once).
captures = sa.Table(
    "captures", metadata, sa.Column("id", sa.Text(), primary_key=True), _text("device"), _text("model_sha256"),
    _text("model_version"), _double("window_start"), _double("created"), _text("request_id", True),
    _bigint("row_index"), sa.Column("predicted", sa.Integer(), nullable=False), _text("label", True),
    _text("label_source", True), _text("shard"), sa.Column("position", sa.Integer(), nullable=False),
    _bigint("bytes"), _double("stored_at"))

capture_requests = sa.Table(
    "capture_requests", metadata, sa.Column("id", sa.Text(), primary_key=True), _text("fleet"), _text("device"),
    _bigint("samples"), _text("reason"), _double("created"))
