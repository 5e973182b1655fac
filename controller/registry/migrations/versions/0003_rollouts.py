"""Rollouts: staged rollouts, per-device progress, decisions; bundle re-issues; telemetry minutes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Written by hand to mirror ``registry/models.py`` as of this revision (the test
suite compares the two). Types are spelled out rather than imported from the
models so that this file keeps describing revision 0003.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    """A timezone-aware timestamp column (``UTCDateTime`` in the models)."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Add bundle re-issue columns and the rollout and telemetry-minute tables."""
    with op.batch_alter_table("bundles") as batch:
        batch.add_column(sa.Column("release", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reissue_of", sa.Integer(), nullable=True))

    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        _ts("wave_started_at", nullable=True),
        _ts("next_wave_at", nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("deadline_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name="fk_rollouts_model_version_id_model_versions",
        ),
    )
    op.create_index("ix_rollouts_model_version_id", "rollouts", ["model_version_id"])
    op.create_index("ix_rollouts_status", "rollouts", ["status"])

    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=True),
        sa.Column("bundle_id", sa.Integer(), nullable=True),
        sa.Column("previous_bundle_id", sa.Integer(), nullable=True),
        sa.Column("baseline_p95_ms", sa.Double(), nullable=True),
        sa.Column("telemetry_mark", sa.BigInteger(), nullable=True),
        sa.Column("rollback_deployment_id", sa.String(32), nullable=True),
        sa.Column("rollback_generation", sa.Integer(), nullable=True),
        sa.Column("rollback_bundle_id", sa.Integer(), nullable=True),
        _ts("joined_at"),
        _ts("started_at", nullable=True),
        _ts("state_since"),
        sa.Column("observed_p95_ms", sa.Double(), nullable=True),
        sa.Column("observed_requests", sa.BigInteger(), nullable=True),
        sa.Column("observed_errors", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name="pk_rollout_devices"),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name="fk_rollout_devices_rollout_id_rollouts"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_rollout_devices_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.create_index(
        "ix_rollout_devices_rollout_id_state", "rollout_devices", ["rollout_id", "state"]
    )

    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("rollout_id", sa.String(32), nullable=False),
        _ts("at"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rollout_decisions"),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name="fk_rollout_decisions_rollout_id_rollouts"
        ),
    )
    op.create_index("ix_rollout_decisions_rollout_id_id", "rollout_decisions", ["rollout_id", "id"])

    op.create_table(
        "telemetry_minutes",
        sa.Column("device_id", sa.String(64), nullable=False),
        _ts("minute"),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p95_weighted_ms", sa.Double(), nullable=False),
        sa.Column("p95_weight", sa.BigInteger(), nullable=False),
        sa.Column("p95_max_ms", sa.Double(), nullable=True),
        sa.Column("rss_max_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cpu_percent_sum", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "device_id", "minute", "model_version", name="pk_telemetry_minutes"
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_telemetry_minutes_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_telemetry_minutes_minute", "telemetry_minutes", ["minute"])


def downgrade() -> None:
    op.drop_table("telemetry_minutes")
    op.drop_table("rollout_decisions")
    op.drop_table("rollout_devices")
    op.drop_table("rollouts")
    with op.batch_alter_table("bundles") as batch:
        batch.drop_column("reissue_of")
        batch.drop_column("release")
