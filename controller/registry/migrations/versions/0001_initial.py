"""Initial registry schema: models, devices, deployments, desired state, ingest.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written by hand to mirror ``registry/models.py`` as of this revision; the test
suite compares the migrated schema with the ORM metadata. Column types are
spelled out here instead of imported from the models, because a migration
must keep describing *this* revision after the models move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    """A timezone-aware timestamp column (``UTCDateTime`` in the models)."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _bigint_key(name: str) -> sa.Column[object]:
    """A 64-bit autoincrement key that stays a rowid alias on SQLite."""
    return sa.Column(name, sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False)


def upgrade() -> None:
    """Create every registry table."""
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("last_release", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", name="uq_models_name"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("release", sa.Integer(), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_model_versions_model_id_models"
        ),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),
        sa.UniqueConstraint("model_id", "release", name="uq_model_versions_model_id_release"),
    )
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("hardware_class", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("precision", sa.String(16), nullable=False),
        sa.Column("target_path", sa.String(512), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_bundles"),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name="fk_bundles_model_version_id_model_versions",
        ),
        sa.UniqueConstraint("target_path", name="uq_bundles_target_path"),
    )
    op.create_index("ix_bundles_model_version_id", "bundles", ["model_version_id"])

    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("hardware_class", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("cpu_features", sa.JSON(), nullable=False),
        sa.Column("runtimes", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        _ts("last_seen", nullable=True),
        _ts("enrolled_at"),
        sa.Column("reported", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(16), nullable=True),
        sa.Column("active_model", sa.String(128), nullable=True),
        sa.Column("active_version", sa.String(64), nullable=True),
        sa.Column("active_release", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
    )

    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deployments"),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name="fk_deployments_model_version_id_model_versions",
        ),
    )
    op.create_index("ix_deployments_model_version_id", "deployments", ["model_version_id"])

    op.create_table(
        "deployment_targets",
        sa.Column("deployment_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("deployment_id", "device_id", name="pk_deployment_targets"),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name="fk_deployment_targets_deployment_id_deployments",
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_deployment_targets_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name="fk_deployment_targets_bundle_id_bundles"
        ),
    )
    op.create_index("ix_deployment_targets_device_id", "deployment_targets", ["device_id"])

    op.create_table(
        "desired_states",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.String(32), nullable=True),
        sa.Column("bundle_id", sa.Integer(), nullable=True),
        sa.Column(
            "published_generation", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("device_id", name="pk_desired_states"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_desired_states_device_id_devices",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name="fk_desired_states_deployment_id_deployments",
        ),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name="fk_desired_states_bundle_id_bundles"
        ),
    )

    op.create_table(
        "device_events",
        _bigint_key("id"),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("deployment_id", sa.String(64), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        _ts("at"),
        sa.PrimaryKeyConstraint("id", name="pk_device_events"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_device_events_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_device_events_device_id_id", "device_events", ["device_id", "id"])

    op.create_table(
        "telemetry",
        _bigint_key("id"),
        sa.Column("device_id", sa.String(64), nullable=False),
        _ts("at"),
        sa.Column("window_s", sa.Double(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p50_ms", sa.Double(), nullable=True),
        sa.Column("p95_ms", sa.Double(), nullable=True),
        sa.Column("p99_ms", sa.Double(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cpu_percent", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_telemetry_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_telemetry_device_id_id", "telemetry", ["device_id", "id"])

    op.create_table(
        "counters",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )


def downgrade() -> None:
    """Drop every registry table, dependents first."""
    for table in (
        "counters",
        "telemetry",
        "device_events",
        "desired_states",
        "deployment_targets",
        "deployments",
        "devices",
        "bundles",
        "model_versions",
        "models",
    ):
        op.drop_table(table)
