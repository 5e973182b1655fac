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

__all__ = ["Counters", "read_counters"]


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

        def work(s: Session) -> None:
            result = s.execute(
                sa.update(m.Counter)
                .where(m.Counter.name == name)
                .values(value=m.Counter.value + by)
            )
            if not rowcount(result):
                s.add(m.Counter(name=name, value=by))
                s.flush()

        self._db.write_retrying(work)

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
