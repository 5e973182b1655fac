"""Fleet views: per-device summaries and fleet-wide totals."""

from __future__ import annotations

from edgefleet.controller.registry import Registry
from edgefleet.protocols.messages import (
    AgentState,
    ErrorInfo,
    ModelRef,
)
from tests.controller.registry.builders import (
    make_bundle,
    make_report,
    make_telemetry,
    make_version,
)


def test_telemetry_summaries(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")
    registry.enroll_device("c")
    registry.create_deployment(mv.id, ["a"])
    registry.record_reported(
        make_report("a", active=ModelRef("clf", "1.0", 1, "clf/t.tar"), hardware_class="generic")
    )
    registry.record_reported(
        make_report("b", state=AgentState.FAILED, error=ErrorInfo("no_space", "disk full"))
    )
    registry.set_online("a", True)

    stored = registry.add_telemetry(
        [
            make_telemetry("a", 100, p50=4.0, errors=1),
            make_telemetry("a", 50, p50=6.5, errors=2),
            make_telemetry("a", 0, p50=None),  # idle window: no latency
            make_telemetry("b", 7, p50=1.0),
            make_telemetry("ghost", 1000, p50=1.0),
        ]
    )
    assert stored == 4

    summaries = {s.device_id: s for s in registry.device_summaries()}
    assert list(summaries) == ["a", "b", "c"]
    a, b, c = summaries["a"], summaries["b"], summaries["c"]
    assert (a.inferences, a.errors, a.p50_ms) == (150, 3, 6.5)
    assert (a.active_model, a.active_version) == ("clf", "1.0")
    assert (a.desired_model, a.desired_version) == ("clf", "1.0")
    assert a.online is True
    assert (b.inferences, b.p50_ms, b.state) == (7, 1.0, "failed")
    assert (b.last_error_code, b.last_error_message) == ("no_space", "disk full")
    assert (b.desired_version, b.active_version) == (None, None)
    assert (c.inferences, c.errors, c.p50_ms, c.last_seen) == (0, 0, None, None)

    newest = registry.telemetry_for("a")
    assert [t.requests for t in newest] == [0, 50, 100]
    assert newest[0].p50_ms is None
    assert (newest[1].p95_ms, newest[1].p99_ms, newest[1].model_version) == (13.0, 19.5, "1.0")
    assert len(registry.telemetry_for("a", limit=2)) == 2

    status = registry.fleet_status()
    assert (
        status.devices,
        status.online,
        status.offline,
        status.failed,
    ) == (3, 1, 2, 1)
    assert status.versions == {"clf@1.0": 1}
    assert (status.inferences, status.errors) == (157, 3)


def test_empty_fleet_status(registry: Registry) -> None:
    status = registry.fleet_status()
    assert (status.devices, status.inferences, status.versions, status.counters) == (
        0,
        0,
        {},
        {},
    )
    assert registry.device_summaries() == []
