"""Telemetry rollups on real databases: folding is exact, idempotent, and retention applies."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.telemetry import rollup_telemetry
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import LatencySummary, ModelRef, Telemetry

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    r = Registry(database_url)
    r.enroll_device("d1")
    yield r
    r.close()


def point(
    at: datetime, requests: int, errors: int, p95: float | None, version: str = "1.0"
) -> Telemetry:
    return Telemetry(
        "d1",
        10.0,
        requests,
        errors,
        None if p95 is None else LatencySummary(p95, p95, p95),
        ModelRef("m", version, 1, "m/t"),
        1000,
        10.0,
        at=at.timestamp(),
    )


def minutes(registry: Registry) -> list[tuple[datetime, str, int, int, int, float | None]]:
    with registry.engine.connect() as c:
        rows = c.execute(sa.select(m.TelemetryMinute).order_by(m.TelemetryMinute.minute)).all()
    return [
        (
            r.minute.replace(tzinfo=timezone.utc) if r.minute.tzinfo is None else r.minute,
            r.model_version,
            r.windows,
            r.requests,
            r.errors,
            (r.p95_weighted_ms / r.p95_weight) if r.p95_weight else None,
        )
        for r in rows
    ]


def test_rollup_folds_exactly_once_and_applies_retention(registry: Registry) -> None:
    registry.add_telemetry(
        [
            point(T0 + timedelta(seconds=5), 10, 1, 2.0),
            point(T0 + timedelta(seconds=35), 30, 0, 4.0),
            point(T0 + timedelta(seconds=50), 0, 0, None),
            point(T0 + timedelta(seconds=65), 5, 5, 1.0, version="2.0"),
        ]
    )
    now = T0 + timedelta(minutes=5)
    first = rollup_telemetry(registry, raw_retention_s=3600, minute_retention_s=7200, now=now)
    assert first is not None and (first.folded, first.minutes_touched, first.raw_deleted) == (
        4,
        2,
        0,
    )
    again = rollup_telemetry(registry, raw_retention_s=3600, minute_retention_s=7200, now=now)
    assert again is not None and again.folded == 0
    # A late window for an existing minute merges into it.
    registry.add_telemetry([point(T0 + timedelta(seconds=55), 10, 0, 6.0)])
    rollup_telemetry(registry, raw_retention_s=3600, minute_retention_s=7200, now=now)
    assert minutes(registry) == [
        (T0, "1.0", 4, 50, 1, pytest.approx((10 * 2 + 30 * 4 + 10 * 6) / 50)),
        (T0 + timedelta(minutes=1), "2.0", 1, 5, 5, 1.0),
    ]
    # Past the raw retention, raw windows go; minutes stay until theirs.
    later = T0 + timedelta(hours=1, minutes=5)
    result = rollup_telemetry(registry, raw_retention_s=3600, minute_retention_s=7200, now=later)
    assert result is not None and result.raw_deleted == 5 and result.minutes_deleted == 0
    assert registry.telemetry_for("d1") == []
    assert len(minutes(registry)) == 2
    result = rollup_telemetry(
        registry, raw_retention_s=3600, minute_retention_s=7200, now=T0 + timedelta(hours=3)
    )
    assert result is not None and result.minutes_deleted == 2


def test_bad_retentions_are_refused(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="must not exceed the per-minute retention"):
        rollup_telemetry(registry, raw_retention_s=100, minute_retention_s=10)
    with pytest.raises(ConfigError, match=">= 0"):
        rollup_telemetry(registry, raw_retention_s=-1, minute_retention_s=10)
