"""One poisoned row can never crash ``devices``, ``status`` or the rollup (issue 9, item 5).

Validation now keeps out-of-range values from being stored, but rows written
by an older version (or a bug) stay in the database. Each test inserts such
rows straight through SQL, bypassing validation, and proves the view or the
rollup still works and reports only what valid rows say.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, cast

import sqlalchemy as sa

from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.telemetry import rollup_telemetry
from tests.controller.registry.builders import make_telemetry, make_version

TABLE = cast("sa.Table", m.TelemetryRecord.__table__)
INT64_MAX = 2**63 - 1
NOW = datetime(2026, 12, 1, 12, 0, 30, tzinfo=timezone.utc)


def _row(device_id: str, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "device_id": device_id,
        "at": NOW,
        "window_s": 10.0,
        "requests": 1,
        "errors": 0,
        "p50_ms": 1.0,
        "p95_ms": 2.0,
        "p99_ms": 3.0,
        "model_version": "1.0",
        "rss_bytes": 1000,
        "cpu_percent": 1.0,
    }
    row.update(values)
    return row


def _poison(registry: Registry, rows: list[dict[str, Any]]) -> None:
    """Insert rows as an older version or a bug could have: no validation at all."""
    with registry.engine.begin() as connection:
        connection.execute(sa.insert(TABLE), rows)


POISON = [
    # Two of these overflowed SUM(requests) on SQLite ("integer overflow").
    {"requests": INT64_MAX, "errors": INT64_MAX, "p50_ms": 5.0},
    {"requests": INT64_MAX, "errors": 0, "p95_ms": float("inf"), "rss_bytes": INT64_MAX},
    {"requests": -(2**62), "errors": -7, "p50_ms": -3.0, "cpu_percent": -50.0},
    {"requests": 10, "errors": 11},  # more errors than requests
]


def _fleet(registry: Registry) -> None:
    make_version(registry)
    registry.enroll_device("a")
    registry.enroll_device("b")
    registry.add_telemetry(
        [make_telemetry("a", 100, p50=4.0, errors=1), make_telemetry("b", 7, p50=1.0)]
    )
    _poison(registry, [_row("a", **values) for values in POISON])
    with registry.engine.begin() as connection:  # one minute for all: one row per device
        connection.execute(sa.update(TABLE).values(at=NOW))


def test_devices_view_survives_poisoned_rows(registry: Registry) -> None:
    _fleet(registry)
    # The newest window with requests has a negative p50: shown as not measured.
    _poison(registry, [_row("b", requests=3, p50_ms=-1.0)])
    summaries = {s.device_id: s for s in registry.device_summaries()}
    a, b = summaries["a"], summaries["b"]
    # Only valid rows count: 100 requests and 1 error from "a"'s real window,
    # plus the row with 10 requests (its 11 errors are impossible, so left out).
    assert (a.inferences, a.errors) == (110, 1)
    assert a.p50_ms == 1.0  # the newest valid window (10 requests, p50 1.0)
    assert (b.inferences, b.errors, b.p50_ms) == (10, 0, None)


def test_status_view_survives_poisoned_rows(registry: Registry) -> None:
    _fleet(registry)
    status = registry.fleet_status()
    assert (status.devices, status.inferences, status.errors) == (2, 117, 1)


def test_rollup_survives_poisoned_rows_and_saturates(registry: Registry) -> None:
    _fleet(registry)
    result = rollup_telemetry(
        registry, raw_retention_s=3600, minute_retention_s=7200, now=NOW + timedelta(minutes=5)
    )
    assert result is not None and result.folded == 2 + len(POISON)
    with registry.database.read() as s:
        minutes = {
            r.device_id: r
            for r in s.scalars(sa.select(m.TelemetryMinute).order_by(m.TelemetryMinute.device_id))
        }
    a = minutes["a"]
    assert (a.windows, a.requests, a.errors) == (5, 110, 1)
    assert a.rss_max_bytes == 10_000_000  # the poisoned INT64_MAX is not a measurement
    assert a.p95_max_ms is not None and a.p95_max_ms < float("inf")

    # A minute row already at the int64 maximum (written by an older version)
    # saturates instead of failing every later rollup of the fleet.
    with registry.database.write() as s:
        row = s.get(m.TelemetryMinute, ("a", a.minute, "1.0"))
        assert row is not None
        row.requests = INT64_MAX
    registry.add_telemetry([make_telemetry("a", 2**53, p50=1.0)])
    _poison(registry, [_row("a", requests=INT64_MAX)])
    with registry.engine.begin() as connection:
        connection.execute(sa.update(TABLE).values(at=NOW))
    again = rollup_telemetry(
        registry, raw_retention_s=3600, minute_retention_s=7200, now=NOW + timedelta(minutes=5)
    )
    assert again is not None and again.folded == 2
    with registry.database.read() as s:
        row = s.get(m.TelemetryMinute, ("a", a.minute, "1.0"))
        assert row is not None and row.requests == INT64_MAX


def test_rows_dated_far_in_the_future_still_expire(registry: Registry) -> None:
    make_version(registry)
    registry.enroll_device("a")
    _poison(registry, [_row("a", at=datetime(9999, 1, 1, tzinfo=timezone.utc))])
    rollup_telemetry(registry, raw_retention_s=3600, minute_retention_s=7200, now=NOW)
    with registry.database.read() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(TABLE)) == 0
        assert s.scalar(sa.select(sa.func.count()).select_from(m.TelemetryMinute)) == 0
