"""Read-only counts and series for the management API and ``/metrics``.

Everything here is one read transaction of a few aggregate queries, so a
Prometheus scrape or a dashboard refresh costs the same for ten devices or
ten thousand. Results group by bounded values only (state, version, profile,
rollout status, decision kind), never by device: those become metric labels.

:func:`telemetry_series` reads the per-minute rollups
(:class:`~edgefleet.controller.registry.models.TelemetryMinute`), which keep
a month, rather than raw windows, which keep a day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import HasDatabase

__all__ = [
    "DeviceCount",
    "MinutePoint",
    "decision_counts",
    "device_counts",
    "newest_telemetry_at",
    "rollout_counts",
    "tag_counts",
    "telemetry_series",
]


@dataclass(frozen=True)
class DeviceCount:
    """How many devices share one (online, state, version, profile)."""

    online: bool
    state: str
    version: str
    profile: str
    count: int


@dataclass(frozen=True)
class MinutePoint:
    """One minute of one device's telemetry while it ran ``model_version``.

    ``p95_ms`` is the request-weighted mean of the windows' p95 (``None``
    when no window measured latency), ``p95_max_ms`` their maximum; ``cpu_percent``
    is the mean over windows, ``rss_bytes`` the maximum.
    """

    minute: datetime
    model_version: str
    windows: int
    requests: int
    errors: int
    p95_ms: float | None
    p95_max_ms: float | None
    rss_bytes: int
    cpu_percent: float


def device_counts(registry: HasDatabase) -> list[DeviceCount]:
    """Devices grouped by online, agent state, running ``name@version`` and profile.

    Unknown values are ``""`` (no state reported yet, nothing running, no
    matched profile), so every device is counted exactly once.
    """
    d = m.Device
    stmt = sa.select(
        d.online, d.state, d.active_model, d.active_version, d.profile, sa.func.count()
    ).group_by(d.online, d.state, d.active_model, d.active_version, d.profile)
    with registry.database.read() as s:
        rows = s.execute(stmt).all()
    out: dict[tuple[bool, str, str, str], int] = {}
    for online, state, model, ver, profile, n in rows:
        label = f"{model}@{ver}" if model and ver else ""
        key = (bool(online), state or "", label, profile or "")
        out[key] = out.get(key, 0) + int(n)
    return [DeviceCount(*k, count=n) for k, n in sorted(out.items())]


def tag_counts(registry: HasDatabase) -> dict[str, int]:
    """Every tag in use and how many devices carry it.

    Tags are a JSON list per device, which SQLite and PostgreSQL unnest
    differently, so the lists are read and counted here (one small column).
    """
    counts: dict[str, int] = {}
    with registry.database.read() as s:
        for tags in s.scalars(sa.select(m.Device.tags)):
            for tag in set(tags or ()):
                if isinstance(tag, str):
                    counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items()))


def rollout_counts(registry: HasDatabase) -> dict[str, int]:
    """Rollouts by status."""
    r = m.Rollout
    with registry.database.read() as s:
        return {
            status: int(n)
            for status, n in s.execute(sa.select(r.status, sa.func.count()).group_by(r.status))
        }


def decision_counts(registry: HasDatabase) -> dict[str, int]:
    """Rollout decisions ever recorded, by kind (``started``, ``halted``, ...)."""
    d = m.RolloutDecision
    with registry.database.read() as s:
        return {
            kind: int(n)
            for kind, n in s.execute(sa.select(d.kind, sa.func.count()).group_by(d.kind))
        }


def newest_telemetry_at(registry: HasDatabase) -> datetime | None:
    """The time of the most recently stored telemetry window (by id: an index read)."""
    t = m.TelemetryRecord
    with registry.database.read() as s:
        return s.scalar(sa.select(t.at).order_by(t.id.desc()).limit(1))


def telemetry_series(
    registry: HasDatabase,
    device_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 1440,
) -> list[MinutePoint]:
    """A device's per-minute telemetry, oldest first: at most the newest ``limit`` minutes."""
    t = m.TelemetryMinute
    stmt = sa.select(t).where(t.device_id == device_id)
    if since is not None:
        stmt = stmt.where(t.minute >= since)
    if until is not None:
        stmt = stmt.where(t.minute < until)
    stmt = stmt.order_by(t.minute.desc(), t.model_version).limit(max(0, limit))
    with registry.database.read() as s:
        rows = list(s.scalars(stmt))
    points = [
        MinutePoint(
            minute=r.minute,
            model_version=r.model_version,
            windows=r.windows,
            requests=r.requests,
            errors=r.errors,
            p95_ms=(r.p95_weighted_ms / r.p95_weight) if r.p95_weight else None,
            p95_max_ms=r.p95_max_ms,
            rss_bytes=r.rss_max_bytes,
            cpu_percent=(r.cpu_percent_sum / r.windows) if r.windows else 0.0,
        )
        for r in rows
    ]
    points.reverse()
    return points
