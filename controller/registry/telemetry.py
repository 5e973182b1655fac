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

Every value read back is judged again (:func:`clean_count`,
:func:`clean_latency`, and :func:`summed_count` / :func:`valid_latency` in
SQL): rows written by an older version or a bug may hold ``2**63 - 1``
requests, negative counts or an infinite latency, and one such row must not
make a ``SUM`` overflow or a rollup fail for the whole fleet. Out-of-range
values count as nothing (``0`` requests, no latency), sums run as floats
(values are at most ``2**53`` each, so no realistic number of rows
overflows), and the minute rows' integer columns saturate at the int64
maximum.

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
from typing import Any, TypeAlias, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Session

from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database, HasDatabase
from edgefleet.controller.registry.devices import known_device_ids
from edgefleet.controller.registry.dto import TelemetryInfo
from edgefleet.protocols.bounds import MAX_COUNT, MAX_CPU_PERCENT, MAX_LATENCY_MS
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import Telemetry

__all__ = [
    "FUTURE_LIMIT",
    "INT64_MAX",
    "ROLLUP_MARK",
    "RollupResult",
    "TelemetryStore",
    "clean_count",
    "clean_latency",
    "rollup_telemetry",
    "summed_count",
    "telemetry_info",
    "valid_count",
    "valid_latency",
]

ROLLUP_MARK = "telemetry.rollup_mark"
_PG_ROLLUP_LOCK = 0x65666C74_726F6C6C  # "efltroll"
INT64_MAX = 2**63 - 1
# A column in SQL expressions: a mapped attribute or any column expression.
_T = TypeVar("_T")
_Col: TypeAlias = "sa.ColumnElement[_T] | InstrumentedAttribute[_T]"
# Stored rows dated further ahead than this are expired at once: no clock
# is that far off (ingest refuses `at` beyond `max_clock_skew_s`), so they
# come from a bug or an older version, and would otherwise never expire.
FUTURE_LIMIT = timedelta(days=1)


# --------------------------------------------------------------------------- poisoned rows
def clean_count(value: object) -> int:
    """A stored count if it is one a valid message could carry, else 0."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return 0
    return value


def clean_latency(value: object) -> float | None:
    """A stored latency if it is a finite one in range, else ``None`` (not measured)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0.0 <= value <= MAX_LATENCY_MS:  # False for NaN too
        return None
    return float(value)


def valid_count(column: _Col[Any]) -> sa.ColumnElement[bool]:
    """SQL: the row's ``column`` is a count a valid message could carry."""
    return column.between(0, MAX_COUNT)


def summed_count(column: _Col[int], *, at_most: _Col[int] | None = None) -> sa.ColumnElement[float]:
    """SQL: ``SUM(column)`` over valid counts only, as a float that cannot overflow.

    SQLite raises "integer overflow" when an integer ``SUM`` leaves int64,
    and PostgreSQL's ``NUMERIC`` sum would let a poisoned row through as a
    huge total; summing in-range values as doubles does neither. With
    ``at_most`` (errors against requests), a row counts only if its value
    does not exceed that valid column of the same row.
    """
    valid = valid_count(column)
    if at_most is not None:
        valid = sa.and_(valid, valid_count(at_most), column <= at_most)
    return sa.func.coalesce(
        sa.func.sum(sa.case((valid, sa.cast(column, sa.Float)), else_=0.0)), 0.0
    )


def valid_latency(column: _Col[float | None]) -> sa.ColumnElement[bool]:
    """SQL: the latency is finite and in range (PostgreSQL's NaN sorts above it)."""
    return column.between(0.0, MAX_LATENCY_MS)


def _in_cpu_range(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0.0 <= value <= MAX_CPU_PERCENT
    )


def _saturate(value: int) -> int:
    return min(max(value, 0), INT64_MAX)


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
            rows = [
                (
                    p.device_id,
                    m.from_epoch(p.at, now),
                    p.window_s,
                    p.requests,
                    p.errors,
                    None if p.latency_ms is None else p.latency_ms.p50,
                    None if p.latency_ms is None else p.latency_ms.p95,
                    None if p.latency_ms is None else p.latency_ms.p99,
                    None if p.model is None else p.model.version,
                    p.rss_bytes,
                    p.cpu_percent,
                    p.samples,
                    None if p.sample_latency_ms is None else p.sample_latency_ms.p95,
                )
                for p in points
                if p.device_id in known
            ]
            if not rows:
                return 0
            if s.get_bind().dialect.name == "postgresql":
                _copy_rows(s, rows)
            else:
                # Plain rows through one Core executemany: ORM objects cost
                # several times more per row here.
                s.execute(
                    sa.insert(cast("sa.Table", m.TelemetryRecord.__table__)),
                    [dict(zip(_COLUMNS, row, strict=True)) for row in rows],
                )
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


_COLUMNS = (
    "device_id",
    "at",
    "window_s",
    "requests",
    "errors",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "model_version",
    "rss_bytes",
    "cpu_percent",
    "samples",
    "sample_p95_ms",
)


def _copy_rows(s: Session, rows: list[tuple[Any, ...]]) -> None:
    """Write telemetry rows with PostgreSQL's ``COPY FROM STDIN``, in ``s``'s transaction.

    SQLAlchemy's executemany on psycopg sends one INSERT per row through a
    pipeline: the server parses and plans each of them (~100 us a row on
    this machine under load, most of the ingest thread's time). COPY streams
    the whole batch as one statement. Values need no bind processing:
    ``at`` is already an aware UTC datetime (``from_epoch``, ``utcnow``),
    which is what ``UTCDateTime`` would hand to psycopg.
    """
    raw: Any = s.connection().connection.driver_connection
    table = m.TelemetryRecord.__tablename__
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


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
        for (
            _id,
            device_id,
            at,
            version,
            raw_requests,
            raw_errors,
            raw_p95,
            raw_rss,
            raw_cpu,
        ) in rows:
            requests = clean_count(raw_requests)
            errors = clean_count(raw_errors)
            if errors > requests:  # impossible: count no errors rather than invent some
                errors = 0
            p95 = clean_latency(raw_p95)
            rss = clean_count(raw_rss)
            cpu = float(raw_cpu) if _in_cpu_range(raw_cpu) else 0.0
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
                # Integer columns saturate: a minute row that already holds a
                # poisoned value stays at the int64 maximum instead of failing
                # the whole rollup on the write.
                row.windows = min(row.windows + int(acc[0]), 2**31 - 1)
                row.requests = _saturate(row.requests + int(acc[1]))
                row.errors = _saturate(row.errors + int(acc[2]))
                row.p95_weighted_ms += float(acc[3])
                row.p95_weight = _saturate(row.p95_weight + int(acc[4]))
                top = p95_max.get(key)
                if top is not None:
                    row.p95_max_ms = top if row.p95_max_ms is None else max(row.p95_max_ms, top)
                row.rss_max_bytes = _saturate(max(row.rss_max_bytes, int(acc[5])))
                row.cpu_percent_sum += float(acc[6])
            mark.value = int(rows[-1][0])
        raw_cut = now - timedelta(seconds=raw_retention_s)
        # Rows dated more than FUTURE_LIMIT ahead (stored before `at` was
        # checked against the clock) would otherwise never expire.
        future = now + FUTURE_LIMIT
        raw_deleted = s.execute(
            sa.delete(t).where(t.id <= mark.value, sa.or_(t.at < raw_cut, t.at > future))
        )
        minute_cut = now - timedelta(seconds=minute_retention_s)
        minutes_deleted = s.execute(
            sa.delete(m.TelemetryMinute).where(
                sa.or_(m.TelemetryMinute.minute < minute_cut, m.TelemetryMinute.minute > future)
            )
        )
        return RollupResult(
            folded=len(rows),
            minutes_touched=len(buckets),
            raw_deleted=int(getattr(raw_deleted, "rowcount", 0) or 0),
            minutes_deleted=int(getattr(minutes_deleted, "rowcount", 0) or 0),
        )
