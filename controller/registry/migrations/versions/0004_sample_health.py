"""Per-sample latency: telemetry samples and per-sample p95; rollout baselines under load.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Agents report how many samples (batch rows) a window served and the
sample-weighted p95 of latency per sample; rollouts keep the previous
version's per-sample p95 and the load (mean batch, request rate) it was
measured under, so health compares like with like (issue 9, item 8). All
columns are nullable: older agents do not report them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the per-sample telemetry columns and the rollout load baseline."""
    with op.batch_alter_table("telemetry") as batch:
        batch.add_column(sa.Column("samples", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("sample_p95_ms", sa.Double(), nullable=True))
    with op.batch_alter_table("rollout_devices") as batch:
        batch.add_column(sa.Column("baseline_sample_p95_ms", sa.Double(), nullable=True))
        batch.add_column(sa.Column("baseline_batch", sa.Double(), nullable=True))
        batch.add_column(sa.Column("baseline_rate_rps", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        batch.drop_column("baseline_rate_rps")
        batch.drop_column("baseline_batch")
        batch.drop_column("baseline_sample_p95_ms")
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_column("sample_p95_ms")
        batch.drop_column("samples")
