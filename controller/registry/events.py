"""Device events: what agents said while working on a desired state.

Events arrive in batches from the ingest worker and are stored one batch per
transaction; events of devices that are not enrolled are skipped, not errors.

What one device can make us store is bounded three ways: an event's detail
(its fields this controller does not know) is capped at
:data:`~edgefleet.protocols.bounds.MAX_DETAIL_BYTES` - the parser already
replaces larger ones by a ``_truncated`` marker, and :func:`capped_detail`
re-checks here for callers that did not parse; each device keeps at most
``max_per_device`` rows, its oldest dropped first and counted under
``rejected.event_cap`` and ``device_rejected.<device>.event_cap``; and
:meth:`Events.expire_events` deletes rows older than the retention (the
controller's telemetry loop runs it).

An event numbered by its agent's journal (``journal``, ``seq``) is stored once
however often it arrives: agents replay unacknowledged events, and a
retained copy comes back on every resubscription. After a batch,
:meth:`Events.advance_event_acks` moves each device's mark (``event_journals``) to
the highest ``seq`` stored without a gap - the number the service sends back
on ``events/ack`` so the agent can forget those events.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.counters import bump_in, device_rejected_name
from edgefleet.controller.registry.database import Database, require_text, rowcount
from edgefleet.controller.registry.devices import known_device_ids
from edgefleet.controller.registry.dto import EventInfo, error_info
from edgefleet.protocols.bounds import MAX_DETAIL_BYTES, TRUNCATED_KEY
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import Event

__all__ = [
    "EVENT_CAP_REASON",
    "EventAckMark",
    "Events",
    "capped_detail",
    "event_info",
    "in_device_order",
]

EventAckMark = tuple[str, str, int]
"""``(device_id, journal, acked_seq)``: every event 1..acked_seq of that journal is stored."""

# How many stored numbers one advance looks at per device; a longer run is
# picked up by the next batch's advance.
_ADVANCE_WINDOW = 10_000

EVENT_CAP_REASON = "event_cap"


def capped_detail(extra: dict[str, Any]) -> dict[str, Any]:
    """An event's unknown fields, or a ``_truncated`` marker if they encode too large."""
    size = len(json.dumps(extra, separators=(",", ":"), sort_keys=True, default=str).encode())
    if size <= MAX_DETAIL_BYTES:
        return extra
    return {TRUNCATED_KEY: {"bytes": size, "keys": len(extra)}}


def _trim(s: Session, device_id: str, keep: int) -> int:
    """Delete a device's events beyond its newest ``keep``; returns how many."""
    e = m.DeviceEvent
    # The (device_id, id) index answers both statements without a scan.
    cutoff = s.scalar(
        sa.select(e.id).where(e.device_id == device_id).order_by(e.id.desc()).offset(keep).limit(1)
    )
    if cutoff is None:
        return 0
    return rowcount(s.execute(sa.delete(e).where(e.device_id == device_id, e.id <= cutoff)))


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
        journal=row.journal,
        seq=row.seq,
    )


class Events:
    """Stored device events, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def add_events(self, events: Sequence[Event], *, max_per_device: int | None = None) -> int:
        """Store a batch of events in one transaction.

        ``at`` is the agent's timestamp when it sent one (device clocks may be
        off; ordering uses insertion order instead), else the time of storing.
        With ``max_per_device``, each device of the batch then keeps only its
        newest ``max_per_device`` events: a flooding device loses its own
        oldest rows, never another device's, and every dropped row is counted
        (``rejected.event_cap`` and ``device_rejected.<device>.event_cap``)
        in the same transaction.

        Returns:
            How many were stored; events of devices that are not enrolled are
            skipped.
        """
        if not events:
            return 0
        if max_per_device is not None and max_per_device < 1:
            raise ConfigError("max_per_device must be at least 1")
        now = m.utcnow()

        def work(s: Session) -> int:
            known = known_device_ids(s, {e.device_id for e in events})
            seen = _stored_numbers(s, [e for e in events if e.device_id in known])
            rows = []
            for e in events:
                if e.device_id not in known:
                    continue
                if e.journal is not None and e.seq is not None:
                    key = (e.device_id, e.journal, e.seq)
                    if key in seen:
                        continue  # a replay or a retained copy: stored already
                    seen.add(key)
                detail: dict[str, Any] = {}
                if e.model is not None:
                    detail["model"] = e.model.to_dict()
                if e.bytes_done is not None:
                    detail["bytes_done"] = e.bytes_done
                if e.bytes_total is not None:
                    detail["bytes_total"] = e.bytes_total
                if e.extra:
                    detail["extra"] = capped_detail(dict(e.extra))
                rows.append(
                    m.DeviceEvent(
                        device_id=e.device_id,
                        kind=e.kind.value,
                        deployment_id=e.deployment_id,
                        generation=e.generation,
                        error=None if e.error is None else e.error.to_dict(),
                        detail=detail or None,
                        at=m.from_epoch(e.at, now),
                        journal=e.journal,
                        seq=e.seq,
                    )
                )
            s.add_all(rows)
            if max_per_device is not None and rows:
                s.flush()
                for device_id in sorted({r.device_id for r in rows}):
                    dropped = _trim(s, device_id, max_per_device)
                    if dropped:
                        bump_in(s, f"rejected.{EVENT_CAP_REASON}", dropped)
                        bump_in(s, device_rejected_name(device_id, EVENT_CAP_REASON), dropped)
            return len(rows)

        return self._db.write_retrying(work)

    def advance_event_acks(self, journals: Collection[tuple[str, str]]) -> list[EventAckMark]:
        """Move each ``(device_id, journal)``'s mark past every number stored without a gap.

        A journal other than the device's recorded one replaces it (the
        device's state directory was re-created), starting again from 0.

        Returns:
            The mark of each given journal of an enrolled device, changed or
            not: the service acknowledges it even when nothing new was stored,
            so an agent that missed an ack is told again when it replays.
        """
        if not journals:
            return []
        out: list[EventAckMark] = []
        with self._db.write() as s:
            known = known_device_ids(s, {device for device, _ in journals})
            for device_id, journal in sorted(set(journals)):
                if device_id not in known:
                    continue
                mark = s.get(m.EventJournalMark, device_id)
                if mark is None:
                    mark = m.EventJournalMark(device_id=device_id, journal=journal, acked_seq=0)
                    s.add(mark)
                elif mark.journal != journal:
                    mark.journal, mark.acked_seq = journal, 0
                acked = mark.acked_seq
                following = s.scalars(
                    sa.select(m.DeviceEvent.seq)
                    .where(
                        m.DeviceEvent.device_id == device_id,
                        m.DeviceEvent.journal == journal,
                        m.DeviceEvent.seq > acked,
                    )
                    .order_by(m.DeviceEvent.seq)
                    .limit(_ADVANCE_WINDOW)
                )
                for seq in following:
                    if seq is None or seq != acked + 1:
                        break
                    acked = seq
                mark.acked_seq = acked
                out.append((device_id, journal, acked))
        return out

    def expire_events(self, older_than: datetime, *, now: datetime | None = None) -> int:
        """Delete events whose ``at`` is before ``older_than``; returns how many.

        Events dated more than a day after ``now`` go too: they were stored
        before ``at`` was checked against the clock and would never expire.
        """
        future = (now or m.utcnow()) + timedelta(days=1)
        e = m.DeviceEvent
        with self._db.write() as s:
            return rowcount(s.execute(sa.delete(e).where(sa.or_(e.at < older_than, e.at > future))))

    def add_controller_event(
        self, device_id: str, kind: str, detail: dict[str, Any] | None = None
    ) -> bool:
        """Store an event the controller observed about a device (not one its agent sent).

        For example ``duplicate_device_id`` (:mod:`edgefleet.controller.presence`).
        It has no journal number and is dated now.

        Returns:
            ``False``, storing nothing, if the device is not enrolled.
        """
        require_text(kind, "event kind", 32)
        with self._db.write() as s:
            if s.get(m.Device, device_id) is None:
                return False
            s.add(
                m.DeviceEvent(
                    device_id=device_id,
                    kind=kind,
                    deployment_id=None,
                    generation=0,
                    error=None,
                    detail=None if detail is None else capped_detail(detail),
                    at=m.utcnow(),
                )
            )
            return True

    def events_for(self, device_id: str, limit: int = 50) -> list[EventInfo]:
        """A device's most recent events, newest first, in the device's own order.

        Rows are stored in arrival order, which is not the order things
        happened: an agent replays an unacknowledged event after later ones,
        and controllers sharing the ingestion commit batches in any order.
        The agent numbers its events (``journal``, ``seq``), so within one
        journal the events are put in ``seq`` order, in the places that
        journal's rows take in arrival order; events without a number (older
        agents, the controller's own) keep their arrival place. Timestamps
        are not used: they have the device's clock, and ties within a second.
        """
        with self._db.read() as s:
            rows = list(
                s.scalars(
                    sa.select(m.DeviceEvent)
                    .where(m.DeviceEvent.device_id == device_id)
                    .order_by(m.DeviceEvent.id.desc())
                    .limit(max(limit, 0))
                )
            )
            return [event_info(row) for row in in_device_order(rows)]


def in_device_order(rows: Sequence[m.DeviceEvent]) -> list[m.DeviceEvent]:
    """``rows`` (newest first by arrival) with each journal's events in descending ``seq``.

    Each journal's rows are sorted among themselves and put back into the
    positions that journal occupied, so events of other journals and
    unnumbered ones keep their arrival place.
    """
    positions: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.journal is not None and row.seq is not None:
            positions.setdefault(row.journal, []).append(i)
    out = list(rows)
    for places in positions.values():
        ordered = sorted((rows[i] for i in places), key=lambda r: (r.seq or 0, r.id), reverse=True)
        for place, row in zip(places, ordered, strict=True):
            out[place] = row
    return out


def _stored_numbers(s: Session, events: Sequence[Event]) -> set[tuple[str, str, int]]:
    """Which ``(device_id, journal, seq)`` of ``events`` are stored (one query per journal)."""
    wanted: dict[tuple[str, str], set[int]] = {}
    for e in events:
        if e.journal is not None and e.seq is not None:
            wanted.setdefault((e.device_id, e.journal), set()).add(e.seq)
    found: set[tuple[str, str, int]] = set()
    for (device_id, journal), seqs in wanted.items():
        rows = s.scalars(
            sa.select(m.DeviceEvent.seq).where(
                m.DeviceEvent.device_id == device_id,
                m.DeviceEvent.journal == journal,
                m.DeviceEvent.seq.in_(seqs),
            )
        )
        found.update((device_id, journal, seq) for seq in rows if seq is not None)
    return found
