"""Telemetry: windows stored in batches, read back, rolled up per minute, and expired.

Raw windows (``telemetry``) are what the rollout engine judges health from and
what ``edgefleet devices`` sums; they are many (one per device per interval),
so :meth:`TelemetryStore.add_telemetry` writes a whole ingest batch as plain
rows in one transaction.

:func:`rollup_telemetry` folds every raw window not yet rolled up into its
device's ``telemetry_minutes`` row (keyed by device, minute and model
version), then deletes raw windows older than their retention - only ones
already folded in - and minute rows older than theirs. The controller service
runs it on its own loop, whether or not that controller steps rollouts.

Progress is a watermark (the highest raw id folded in) kept in the
``counters`` table and moved in the same transaction as the aggregates, so a
crash folds nothing twice and loses nothing. Several controllers may call this:
on PostgreSQL a transaction-scoped advisory lock lets one of them work while
the others skip the round; on SQLite the write transaction serializes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database, HasDatabase
from edgefleet.controller.registry.devices import known_device_ids
from edgefleet.controller.registry.dto import TelemetryInfo
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import Telemetry

__all__ = [
    "ROLLUP_MARK",
    "RollupResult",
    "TelemetryStore",
    "rollup_telemetry",
    "telemetry_info",
]

ROLLUP_MARK = "telemetry.rollup_mark"
_PG_ROLLUP_LOCK = 0x65666C74_726F6C6C  # "efltroll"


def telemetry_info(row: m.TelemetryRecord) -> TelemetryInfo:
    """The frozen view of a telemetry row."""
    return TelemetryInfo(
        id=row.id,
        device_id=row.device_id,
        at=row.at,
        window_s=row.window_s,
        requests=row.requests,
        errors=row.errors,
        p50_ms=row.p50_ms,
        p95_ms=row.p95_ms,
        p99_ms=row.p99_ms,
        model_version=row.model_version,
        rss_bytes=row.rss_bytes,
        cpu_percent=row.cpu_percent,
    )


class TelemetryStore:
    """Raw telemetry windows, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def add_telemetry(self, points: Sequence[Telemetry]) -> int:
        """Store a batch of telemetry windows in one transaction.

        Returns:
            How many were stored; points of devices that are not enrolled are
            skipped.
        """
        if not points:
            return 0
        now = m.utcnow()
        with self._db.write() as s:
            known = known_device_ids(s, {p.device_id for p in points})
            # Plain rows through one Core executemany (multi-row VALUES on
            # PostgreSQL): ORM objects cost several times more per row here.
            rows = [
                {
                    "device_id": p.device_id,
                    "at": m.from_epoch(p.at, now),
                    "window_s": p.window_s,
                    "requests": p.requests,
                    "errors": p.errors,
                    "p50_ms": None if p.latency_ms is None else p.latency_ms.p50,
                    "p95_ms": None if p.latency_ms is None else p.latency_ms.p95,
                    "p99_ms": None if p.latency_ms is None else p.latency_ms.p99,
                    "model_version": None if p.model is None else p.model.version,
                    "rss_bytes": p.rss_bytes,
                    "cpu_percent": p.cpu_percent,
                    "samples": p.samples,
                    "sample_p95_ms": None
                    if p.sample_latency_ms is None
                    else p.sample_latency_ms.p95,
                }
                for p in points
                if p.device_id in known
            ]
            if rows:
                s.execute(sa.insert(cast("sa.Table", m.TelemetryRecord.__table__)), rows)
            return len(rows)

    def telemetry_for(self, device_id: str, limit: int = 100) -> list[TelemetryInfo]:
        """A device's most recent telemetry windows, newest first."""
        with self._db.read() as s:
            rows = s.scalars(
                sa.select(m.TelemetryRecord)
                .where(m.TelemetryRecord.device_id == device_id)
                .order_by(m.TelemetryRecord.id.desc())
                .limit(max(limit, 0))
            )
            return [telemetry_info(row) for row in rows]


# --------------------------------------------------------------------------- rollups
@dataclass(frozen=True)
class RollupResult:
    """What one rollup did."""

    folded: int
    minutes_touched: int
    raw_deleted: int
    minutes_deleted: int


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def _mark_row(s: Session) -> m.Counter:
    row = s.get(m.Counter, ROLLUP_MARK)
    if row is None:
        row = m.Counter(name=ROLLUP_MARK, value=0)
        s.add(row)
        s.flush()
    return row


def rollup_telemetry(
    registry: HasDatabase,
    *,
    raw_retention_s: float,
    minute_retention_s: float,
    now: datetime | None = None,
    batch: int = 50_000,
) -> RollupResult | None:
    """Fold up to ``batch`` new raw windows into minutes and apply retention.

    Returns:
        What was done, or ``None`` if another controller is rolling up now.

    Raises:
        ConfigError: a retention is negative, or raw windows would outlive
            nothing (``raw_retention_s`` must not exceed ``minute_retention_s``
            for the minutes to cover what raw data is dropped).
    """
    if raw_retention_s < 0 or minute_retention_s < 0:
        raise ConfigError("telemetry retentions must be >= 0 seconds")
    if raw_retention_s > minute_retention_s:
        raise ConfigError(
            f"raw telemetry retention ({raw_retention_s:g}s) must not exceed the per-minute "
            f"retention ({minute_retention_s:g}s)"
        )
    now = now or m.utcnow()
    t = m.TelemetryRecord
    with registry.database.write() as s:
        if s.get_bind().dialect.name == "postgresql" and not s.scalar(
            sa.select(sa.func.pg_try_advisory_xact_lock(_PG_ROLLUP_LOCK))
        ):
            return None
        mark = _mark_row(s)
        rows = s.execute(
            sa.select(
                t.id,
                t.device_id,
                t.at,
                t.model_version,
                t.requests,
                t.errors,
                t.p95_ms,
                t.rss_bytes,
                t.cpu_percent,
            )
            .where(t.id > mark.value)
            .order_by(t.id)
            .limit(batch)
        ).all()
        buckets: dict[tuple[str, datetime, str], list[float]] = {}
        p95_max: dict[tuple[str, datetime, str], float | None] = {}
        for _id, device_id, at, version, requests, errors, p95, rss, cpu in rows:
            key = (device_id, _minute(at), version or "")
            acc = buckets.setdefault(key, [0, 0, 0, 0.0, 0, 0, 0.0])
            acc[0] += 1
            acc[1] += requests
            acc[2] += errors
            if p95 is not None:
                acc[3] += p95 * requests
                acc[4] += requests
                p95_max[key] = max(p95, p95_max.get(key) or p95)
            acc[5] = max(acc[5], rss)
            acc[6] += cpu
        if buckets:
            devices = {k[0] for k in buckets}
            minutes = {k[1] for k in buckets}
            existing = {
                (r.device_id, r.minute, r.model_version): r
                for r in s.scalars(
                    sa.select(m.TelemetryMinute).where(
                        m.TelemetryMinute.device_id.in_(devices),
                        m.TelemetryMinute.minute.in_(minutes),
                    )
                )
            }
            for key, acc in buckets.items():
                row = existing.get(key)
                if row is None:
                    row = m.TelemetryMinute(
                        device_id=key[0],
                        minute=key[1],
                        model_version=key[2],
                        windows=0,
                        requests=0,
                        errors=0,
                        p95_weighted_ms=0.0,
                        p95_weight=0,
                        p95_max_ms=None,
                        rss_max_bytes=0,
                        cpu_percent_sum=0.0,
                    )
                    s.add(row)
                row.windows += int(acc[0])
                row.requests += int(acc[1])
                row.errors += int(acc[2])
                row.p95_weighted_ms += float(acc[3])
                row.p95_weight += int(acc[4])
                top = p95_max.get(key)
                if top is not None:
                    row.p95_max_ms = top if row.p95_max_ms is None else max(row.p95_max_ms, top)
                row.rss_max_bytes = max(row.rss_max_bytes, int(acc[5]))
                row.cpu_percent_sum += float(acc[6])
            mark.value = int(rows[-1][0])
        raw_cut = now - timedelta(seconds=raw_retention_s)
        raw_deleted = s.execute(sa.delete(t).where(t.id <= mark.value, t.at < raw_cut))
        minute_cut = now - timedelta(seconds=minute_retention_s)
        minutes_deleted = s.execute(
            sa.delete(m.TelemetryMinute).where(m.TelemetryMinute.minute < minute_cut)
        )
        return RollupResult(
            folded=len(rows),
            minutes_touched=len(buckets),
            raw_deleted=int(getattr(raw_deleted, "rowcount", 0) or 0),
            minutes_deleted=int(getattr(minutes_deleted, "rowcount", 0) or 0),
        )
