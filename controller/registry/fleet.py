"""Fleet views: read-only summaries across devices, desired states, telemetry and counters.

These are what ``edgefleet devices`` and ``edgefleet status`` show. Each view
is one read transaction, computed with a few aggregate queries rather than one
query per device, so it stays cheap for large fleets.

They must survive any stored row: sums go through
:func:`~edgefleet.controller.registry.telemetry.summed_count` (valid counts
only, as floats, so ``SUM`` cannot overflow), and a latency out of range
shows as "not measured". A poisoned row, written by an older version or a
bug, is left out of the totals instead of failing ``devices`` or ``status``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.counters import read_counters
from edgefleet.controller.registry.database import Database
from edgefleet.controller.registry.dto import DeviceSummary, FleetStatus, error_info
from edgefleet.controller.registry.telemetry import clean_latency, summed_count, valid_count
from edgefleet.protocols.messages import AgentState

__all__ = [
    "DELIVERY_STATES",
    "DUPLICATE_EVENT_KIND",
    "DUPLICATE_RECENT_S",
    "FleetViews",
    "delivery_state",
    "running_target",
]

DELIVERY_STATES = ("unpublished", "waiting", "unacknowledged", "acknowledged")
"""What became of a device's desired state (see :func:`delivery_state`)."""


def delivery_state(summary: DeviceSummary, now: datetime, ack_timeout_s: float) -> str | None:
    """What became of ``summary``'s desired state; ``None`` if it has none.

    - ``unpublished``: recorded, but no controller has published it yet (is
      ``edgefleet serve`` running, and reaching the broker?);
    - ``waiting``: published, and the device has not reported it yet, for
      less than ``ack_timeout_s``;
    - ``unacknowledged``: published, and not reported by the device within
      ``ack_timeout_s`` (offline? on another broker? a duplicate id?);
    - ``acknowledged``: the device reported this generation (or a later one).
    """
    if summary.desired_generation is None:
        return None
    reported = summary.reported_generation or 0
    if reported >= summary.desired_generation:
        return "acknowledged"
    if not summary.desired_published:
        return "unpublished"
    since = summary.desired_since
    if since is not None and (now - since).total_seconds() > ack_timeout_s:
        return "unacknowledged"
    return "waiting"


def _reported_generation(reported: dict[str, Any] | None) -> int | None:
    value = (reported or {}).get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else None

DUPLICATE_EVENT_KIND = "duplicate_device_id"
"""The event the controller stores when two agents seem to share a device id."""

DUPLICATE_RECENT_S = 15 * 60.0
"""A device is shown as a suspected duplicate this long after the last such event."""


def running_target(reported: dict[str, Any] | None) -> str | None:
    """The bundle target path a stored report says the device runs, if any."""
    active = (reported or {}).get("active")
    target = active.get("target") if isinstance(active, dict) else None
    return target if isinstance(target, str) and target else None


def _variants(s: Session, targets: set[str]) -> dict[str, str]:
    """The variant (bundle hardware class) of each known target path, in one query."""
    if not targets:
        return {}
    rows = s.execute(
        sa.select(m.Bundle.target_path, m.Bundle.hardware_class).where(
            m.Bundle.target_path.in_(targets)
        )
    )
    return {str(path): str(hardware_class) for path, hardware_class in rows}


def _variant_of(target: str | None, known: dict[str, str]) -> str | None:
    if target is None:
        return None
    # A target this registry does not know (re-issued elsewhere): its file name.
    return known.get(target) or target.rsplit("/", 1)[-1].removesuffix(".bundle")


def _duplicates(s: Session, since: datetime) -> dict[str, datetime]:
    """Devices with a duplicate-id event since ``since``, and the newest such event's time."""
    e = m.DeviceEvent
    rows = s.execute(
        sa.select(e.device_id, sa.func.max(e.at))
        .where(e.kind == DUPLICATE_EVENT_KIND, e.at >= since)
        .group_by(e.device_id)
    )
    return {str(device_id): at for device_id, at in rows}


class FleetViews:
    """Fleet-wide read models, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def device_summaries(self) -> list[DeviceSummary]:
        """One summary row per device, by id, computed in a single query."""
        t = m.TelemetryRecord
        totals = (
            sa.select(
                t.device_id,
                summed_count(t.requests).label("requests"),
                summed_count(t.errors, at_most=t.requests).label("errors"),
            )
            .group_by(t.device_id)
            .subquery()
        )
        newest = (
            sa.select(t.device_id, sa.func.max(t.id).label("id"))
            .where(t.requests > 0, valid_count(t.requests))
            .group_by(t.device_id)
            .subquery()
        )
        latest = aliased(m.TelemetryRecord)
        stmt = (
            sa.select(
                m.Device,
                totals.c.requests,
                totals.c.errors,
                latest.p50_ms,
                m.Model.name,
                m.ModelVersion.version,
                m.DesiredStateRecord.generation,
                m.DesiredStateRecord.published_generation,
                m.DesiredStateRecord.updated_at,
            )
            .outerjoin(totals, totals.c.device_id == m.Device.id)
            .outerjoin(newest, newest.c.device_id == m.Device.id)
            .outerjoin(latest, latest.id == newest.c.id)
            .outerjoin(m.DesiredStateRecord, m.DesiredStateRecord.device_id == m.Device.id)
            .outerjoin(m.Bundle, m.Bundle.id == m.DesiredStateRecord.bundle_id)
            .outerjoin(m.ModelVersion, m.ModelVersion.id == m.Bundle.model_version_id)
            .outerjoin(m.Model, m.Model.id == m.ModelVersion.model_id)
            .order_by(m.Device.id)
        )
        with self._db.read() as s:
            result = []
            rows = list(s.execute(stmt))
            targets = {running_target(row[0].reported) for row in rows}
            variants = _variants(s, {t for t in targets if t is not None})
            duplicates = _duplicates(s, m.utcnow() - timedelta(seconds=DUPLICATE_RECENT_S))
            for (
                device,
                requests,
                errors,
                p50,
                desired_model,
                desired_version,
                generation,
                published,
                desired_since,
            ) in rows:
                error = error_info(device.last_error)
                result.append(
                    DeviceSummary(
                        device_id=device.id,
                        hardware_class=device.hardware_class,
                        profile=device.profile,
                        online=device.online,
                        state=device.state,
                        active_model=device.active_model,
                        active_version=device.active_version,
                        last_error_code=None if error is None else error.code,
                        last_error_message=None if error is None else error.message,
                        last_seen=device.last_seen,
                        inferences=int(requests or 0),
                        errors=int(errors or 0),
                        p50_ms=clean_latency(p50),
                        desired_model=desired_model,
                        desired_version=desired_version,
                        variant=_variant_of(running_target(device.reported), variants),
                        tags=tuple(device.tags or ()),
                        duplicate_at=duplicates.get(device.id),
                        desired_generation=generation,
                        desired_published=(
                            None if generation is None else (published or 0) >= generation
                        ),
                        desired_since=desired_since,
                        reported_generation=_reported_generation(device.reported),
                    )
                )
            return result

    def fleet_status(self) -> FleetStatus:
        """Fleet-wide device counts, running versions, inference totals and counters."""
        d = m.Device
        with self._db.read() as s:
            total, online, failed = s.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.count().filter(d.online.is_(True)),
                    sa.func.count().filter(d.state == AgentState.FAILED.value),
                ).select_from(d)
            ).one()
            versions = {
                f"{name}@{version}": count
                for name, version, count in s.execute(
                    sa.select(d.active_model, d.active_version, sa.func.count())
                    .where(d.active_model.is_not(None), d.active_version.is_not(None))
                    .group_by(d.active_model, d.active_version)
                    .order_by(d.active_model, d.active_version)
                )
            }
            requests, errors = s.execute(
                sa.select(
                    summed_count(m.TelemetryRecord.requests),
                    summed_count(m.TelemetryRecord.errors, at_most=m.TelemetryRecord.requests),
                )
            ).one()
            counters = read_counters(s)
            recent = m.utcnow() - timedelta(seconds=DUPLICATE_RECENT_S)
            duplicates = len(_duplicates(s, recent))
        return FleetStatus(
            devices=total,
            online=online,
            offline=total - online,
            failed=failed,
            versions=versions,
            inferences=int(requests or 0),
            errors=int(errors or 0),
            counters=counters,
            duplicates=duplicates,
        )
