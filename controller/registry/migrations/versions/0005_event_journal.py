"""Events carry their agent journal's id and number; stored once per (device, journal, seq).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Agents keep events in a journal until the controller acknowledges them
(``agent/journal.py``), so the same event may arrive several times; the
unique index makes every copy after the first a no-op. ``event_journals``
records per device how far its journal is stored without a gap - the number
the controller acknowledges. Written by hand to mirror ``registry/models.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``device_events.journal``/``seq`` with their unique index, and ``event_journals``."""
    with op.batch_alter_table("device_events") as batch:
        batch.add_column(sa.Column("journal", sa.String(32), nullable=True))
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_device_events_device_id_journal_seq",
        "device_events",
        ["device_id", "journal", "seq"],
        unique=True,
    )
    op.create_table(
        "event_journals",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("journal", sa.String(32), nullable=False),
        sa.Column("acked_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_event_journals"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name="fk_event_journals_device_id_devices",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("event_journals")
    op.drop_index("ix_device_events_device_id_journal_seq", table_name="device_events")
    with op.batch_alter_table("device_events") as batch:
        batch.drop_column("seq")
        batch.drop_column("journal")
