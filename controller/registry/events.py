"""Device events: what agents said while working on a desired state.

Events arrive in batches from the ingest worker and are stored one batch per
transaction; events of devices that are not enrolled are skipped, not errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database
from edgefleet.controller.registry.devices import known_device_ids
from edgefleet.controller.registry.dto import EventInfo, error_info
from edgefleet.protocols.messages import Event

__all__ = ["Events", "event_info"]


def event_info(row: m.DeviceEvent) -> EventInfo:
    """The frozen view of an event row."""
    return EventInfo(
        id=row.id,
        device_id=row.device_id,
        kind=row.kind,
        deployment_id=row.deployment_id,
        generation=row.generation,
        error=error_info(row.error),
        detail=row.detail,
        at=row.at,
    )


class Events:
    """Stored device events, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def add_events(self, events: Sequence[Event]) -> int:
        """Store a batch of events in one transaction.

        ``at`` is the agent's timestamp when it sent one (device clocks may be
        off; ordering uses insertion order instead), else the time of storing.

        Returns:
            How many were stored; events of devices that are not enrolled are
            skipped.
        """
        if not events:
            return 0
        now = m.utcnow()
        with self._db.write() as s:
            known = known_device_ids(s, {e.device_id for e in events})
            rows = []
            for e in events:
                if e.device_id not in known:
                    continue
                detail: dict[str, Any] = {}
                if e.model is not None:
                    detail["model"] = e.model.to_dict()
                if e.bytes_done is not None:
                    detail["bytes_done"] = e.bytes_done
                if e.bytes_total is not None:
                    detail["bytes_total"] = e.bytes_total
                if e.extra:
                    detail["extra"] = dict(e.extra)
                rows.append(
                    m.DeviceEvent(
                        device_id=e.device_id,
                        kind=e.kind.value,
                        deployment_id=e.deployment_id,
                        generation=e.generation,
                        error=None if e.error is None else e.error.to_dict(),
                        detail=detail or None,
                        at=m.from_epoch(e.at, now),
                    )
                )
            s.add_all(rows)
            return len(rows)

    def events_for(self, device_id: str, limit: int = 50) -> list[EventInfo]:
        """A device's most recent events, newest first."""
        with self._db.read() as s:
            rows = s.scalars(
                sa.select(m.DeviceEvent)
                .where(m.DeviceEvent.device_id == device_id)
                .order_by(m.DeviceEvent.id.desc())
                .limit(max(limit, 0))
            )
            return [event_info(row) for row in rows]
