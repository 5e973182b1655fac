"""Device events: batched, unknown devices skipped, details kept."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edgefleet.controller.registry import Registry
from edgefleet.protocols.messages import (
    ErrorInfo,
    Event,
    EventKind,
    ModelRef,
)


def test_events_are_batched_and_skip_unknown_devices(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    model = ModelRef("clf", "1.0", 1, "clf/t.tar")
    events = [
        Event("gw-1", EventKind.DOWNLOAD_STARTED, generation=1, deployment_id="d1", at=1.7e9),
        Event("ghost", EventKind.INSTALLED, generation=1),
        Event(
            "gw-1",
            EventKind.INSTALL_FAILED,
            generation=1,
            model=model,
            error=ErrorInfo("smoke_mismatch", "bad outputs"),
            bytes_done=10,
            bytes_total=20,
        ),
    ]
    assert registry.add_events(events) == 2
    assert registry.add_events([]) == 0
    stored = registry.events_for("gw-1")
    assert [e.kind for e in stored] == ["install_failed", "download_started"]
    assert stored[0].error == ErrorInfo("smoke_mismatch", "bad outputs")
    assert stored[0].detail == {"model": model.to_dict(), "bytes_done": 10, "bytes_total": 20}
    assert stored[1].detail is None
    assert stored[1].deployment_id == "d1"
    assert stored[1].at.timestamp() == pytest.approx(1.7e9)
    assert stored[1].at.tzinfo == timezone.utc
    assert [e.kind for e in registry.events_for("gw-1", limit=1)] == ["install_failed"]
    assert registry.events_for("ghost") == []


# ------------------------------------------------------------- storage bounds (issue 9)
def test_each_device_keeps_at_most_its_cap_and_drops_are_counted(registry: Registry) -> None:
    registry.enroll_device("flood")
    registry.enroll_device("calm")
    registry.add_events([Event("calm", EventKind.INSTALL_FAILED, generation=1)])
    for batch in range(5):
        stored = registry.add_events(
            [
                Event("flood", EventKind.DOWNLOAD_PROGRESS, generation=batch * 10 + i)
                for i in range(10)
            ]
            + [Event("calm", EventKind.VERIFIED, generation=batch)],
            max_per_device=8,
        )
        assert stored == 11
    flood = registry.events_for("flood", limit=100)
    assert [e.generation for e in flood] == list(range(49, 41, -1))  # the newest 8
    calm = registry.events_for("calm", limit=100)
    assert len(calm) == 6 and calm[-1].kind == "install_failed"  # never trimmed by another
    counters = registry.counters()
    assert counters["rejected.event_cap"] == 42
    assert counters["device_rejected.flood.event_cap"] == 42
    assert "device_rejected.calm.event_cap" not in counters


def test_event_detail_is_capped_even_without_the_parser(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    registry.add_events(
        [
            Event("gw-1", EventKind.REJECTED, extra={"blob": "x" * 250_000}),
            Event("gw-1", EventKind.REJECTED, extra={"hint": "short"}),
        ]
    )
    short, big = registry.events_for("gw-1")
    assert short.detail == {"extra": {"hint": "short"}}
    assert big.detail is not None
    assert big.detail["extra"] == {"_truncated": {"bytes": 250_011, "keys": 1}}


def test_events_expire_after_the_retention_and_far_future_ones_at_once(
    registry: Registry,
) -> None:
    registry.enroll_device("gw-1")
    now = datetime.now(timezone.utc)
    registry.add_events(
        [
            Event(
                "gw-1", EventKind.VERIFIED, generation=1, at=(now - timedelta(days=40)).timestamp()
            ),
            Event(
                "gw-1", EventKind.VERIFIED, generation=2, at=(now - timedelta(days=1)).timestamp()
            ),
            Event("gw-1", EventKind.VERIFIED, generation=3, at=now.timestamp()),
            # Year 9999: stored before `at` was checked; must not live forever.
            Event("gw-1", EventKind.VERIFIED, generation=4, at=253_370_764_800.0),
        ]
    )
    assert registry.expire_events(now - timedelta(days=30)) == 2
    assert [e.generation for e in registry.events_for("gw-1")] == [3, 2]
