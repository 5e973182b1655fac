"""Device events: batched, unknown devices skipped, details kept."""

from __future__ import annotations

from datetime import timezone

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
