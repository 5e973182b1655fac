"""Named counters: rejections by reason, agent-reported totals, rollup marks.

Counters are created on first use. A bump is one ``UPDATE ... SET value =
value + by``, so concurrent bumps never lose counts; creating a counter may
race and is retried (:meth:`Database.write_retrying`).
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database, require_text, rowcount

__all__ = ["DEVICE_REJECTED_PREFIX", "Counters", "bump_in", "device_rejected_name", "read_counters"]

# Per-device refusals: ``device_rejected.<device>.<reason>``. Only enrolled
# devices and reasons the controller names get one, so their number is
# bounded by the fleet, never by what a device sends.
DEVICE_REJECTED_PREFIX = "device_rejected."


def device_rejected_name(device_id: str, reason: str) -> str:
    """The counter of ``reason`` refusals of one device's messages."""
    return f"{DEVICE_REJECTED_PREFIX}{device_id}.{reason}"[:128]


def bump_in(s: Session, name: str, by: int = 1) -> None:
    """Add ``by`` to a counter inside the caller's write transaction.

    For counts that must commit with the rows they describe (an ingest that
    dropped rows counts them in the same transaction). A create race on
    PostgreSQL surfaces as ``IntegrityError`` and fails the caller's
    transaction, like any other write there.
    """
    result = s.execute(
        sa.update(m.Counter).where(m.Counter.name == name).values(value=m.Counter.value + by)
    )
    if not rowcount(result):
        s.add(m.Counter(name=name, value=by))
        s.flush()


def read_counters(s: Session) -> dict[str, int]:
    """All counters by name, read inside ``s`` (fleet views read them with other totals)."""
    rows = s.execute(sa.select(m.Counter.name, m.Counter.value).order_by(m.Counter.name))
    return {name: int(value) for name, value in rows}


class Counters:
    """Named monotonic counters, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def bump_counter(self, name: str, by: int = 1) -> None:
        """Add ``by`` to a named counter, creating it at zero first if needed.

        The increment is a single ``UPDATE ... SET value = value + by``, so
        concurrent bumps never lose counts.
        """
        require_text(name, "counter name", 128)
        self._db.write_retrying(lambda s: bump_in(s, name, by))

    def set_counters(self, values: Mapping[str, int]) -> None:
        """Set named counters (totals devices report cumulatively), in one transaction."""
        for name in values:
            require_text(name, "counter name", 128)

        def work(s: Session) -> None:
            for name, value in values.items():
                result = s.execute(
                    sa.update(m.Counter).where(m.Counter.name == name).values(value=value)
                )
                if not rowcount(result):
                    s.add(m.Counter(name=name, value=value))
                    s.flush()

        if values:
            self._db.write_retrying(work)

    def counters(self) -> dict[str, int]:
        """All counters by name."""
        with self._db.read() as s:
            return read_counters(s)
