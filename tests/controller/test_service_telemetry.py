"""The service's telemetry loop: rollup and retention run even when rollouts do not.

Rollup and retention used to run inside the rollout loop, so a controller
started with ``run_rollouts=False`` silently kept every raw window forever.
Here a device sends telemetry over the in-memory broker to a
real :class:`ControllerService` on a real database (SQLite, and PostgreSQL
when ``EDGEFLEET_TEST_DATABASE_URL`` is set) that steps no rollouts; its own
telemetry loop must fold the windows into minutes and expire the raw ones.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.telemetry import ROLLUP_MARK
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.messages import Event, EventKind, LatencySummary, ModelRef, Telemetry
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.memlink import MemoryBroker

DEVICE = "gw-rollup"


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def _minutes(registry: Registry) -> list[tuple[int, int, int]]:
    """(windows, requests, errors) of every per-minute row of the device."""
    with registry.engine.connect() as c:
        rows = c.execute(
            sa.select(
                m.TelemetryMinute.windows, m.TelemetryMinute.requests, m.TelemetryMinute.errors
            ).where(m.TelemetryMinute.device_id == DEVICE)
        ).all()
    return [(int(w), int(r), int(e)) for w, r, e in rows]


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    with MemoryBroker() as b:
        yield b


@pytest.fixture
def service(broker: MemoryBroker, database_url: str, tmp_path: Path) -> Iterator[ControllerService]:
    registry = Registry(database_url)
    registry.enroll_device(DEVICE)
    settings = ServiceSettings(
        client_id=f"test-controller-{uuid.uuid4().hex[:8]}",
        ingest_flush_s=0.05,
        run_rollouts=False,
        telemetry_rollup_interval_s=0.2,
        # Raw windows expire as soon as they are folded in; minutes stay.
        telemetry_raw_retention_s=0.0,
        telemetry_minute_retention_s=3600.0,
    )
    svc = ControllerService(
        registry,
        TrustRepository.init(tmp_path / "repository"),
        BrokerSettings(),  # unused: the links come from the in-memory broker
        settings,
        links=broker.link,
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        registry.close()


def test_rollup_and_retention_run_without_rollouts(
    service: ControllerService, broker: MemoryBroker
) -> None:
    registry = service.registry
    assert service.settings.run_rollouts is False
    device = broker.link(f"{DEVICE}-{uuid.uuid4().hex[:8]}")
    device.start()
    try:
        sent_at = time.time() - 120  # older than the raw retention, inside the minutes'
        for i in range(3):
            point = Telemetry(
                DEVICE,
                10.0,
                5,
                1,
                LatencySummary(1.0, 2.0, 3.0),
                ModelRef("m", "1.0", 1, "m/t.tar"),
                1000,
                5.0,
                at=sent_at + i,
            )
            topic = str(DeviceTopic(DEVICE, Channel.TELEMETRY))
            assert device.publish(topic, point.encode(), qos=1, wait_s=5.0)
        _wait_for(
            lambda: sum(w for w, _, _ in _minutes(registry)) == 3,
            20.0,
            "all three windows folded into per-minute rows",
        )
        _wait_for(lambda: registry.telemetry_for(DEVICE) == [], 20.0, "raw windows expired")
    finally:
        device.stop()
    rows = _minutes(registry)
    assert sum(r for _, r, _ in rows) == 15
    assert sum(e for _, _, e in rows) == 3
    assert registry.counters()[ROLLUP_MARK] > 0


@pytest.fixture
def retaining(
    broker: MemoryBroker, database_url: str, tmp_path: Path
) -> Iterator[ControllerService]:
    """A service that keeps events 60 s and refuses timestamps more than 300 s off."""
    registry = Registry(database_url)
    registry.enroll_device(DEVICE)
    svc = ControllerService(
        registry,
        TrustRepository.init(tmp_path / "repository"),
        BrokerSettings(),
        ServiceSettings(
            client_id=f"test-controller-{uuid.uuid4().hex[:8]}",
            ingest_flush_s=0.05,
            run_rollouts=False,
            telemetry_rollup_interval_s=0.2,
            event_retention_s=60.0,
            max_clock_skew_s=300.0,
        ),
        links=broker.link,
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        registry.close()


def test_event_retention_runs_on_the_telemetry_loop_and_skewed_clocks_are_refused(
    retaining: ControllerService, broker: MemoryBroker
) -> None:
    """Issue 9, items 5 and 6: events expire; `at` beyond the skew is refused and counted."""
    registry = retaining.registry
    device = broker.link(f"{DEVICE}-{uuid.uuid4().hex[:8]}")
    device.start()
    topic = str(DeviceTopic(DEVICE, Channel.EVENTS))
    now = time.time()
    try:
        for generation, at in ((1, now - 120), (2, now), (3, now + 3600), (4, now - 3600)):
            event = Event(DEVICE, EventKind.VERIFIED, generation=generation, at=at)
            assert device.publish(topic, event.encode(), qos=1, wait_s=5.0)
        _wait_for(
            lambda: retaining.rejected().get("clock_skew", 0) == 2,
            20.0,
            "two skewed events counted",
        )
        # The event 120 s old is stored, then expired by the loop; the fresh one stays.
        _wait_for(
            lambda: [e.generation for e in registry.events_for(DEVICE)] == [2],
            20.0,
            f"old event expired, have {registry.events_for(DEVICE)}",
        )
    finally:
        device.stop()
    retaining.flush_rejections()
    assert registry.counters()[f"device_rejected.{DEVICE}.clock_skew"] == 2
