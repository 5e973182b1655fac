"""Devices: enrollment, reported state (including late reports) and online status."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from edgefleet.controller.errors import (
    DuplicateError,
)
from edgefleet.controller.registry import Registry
from edgefleet.protocols.errors import TopicError
from edgefleet.protocols.messages import (
    AgentState,
    ErrorInfo,
    ModelRef,
)
from tests.controller.registry.builders import (
    make_report,
)


def test_concurrent_enrollments_of_one_id_yield_one_device(registry: Registry) -> None:
    outcomes: list[str] = []

    def enroll() -> None:
        try:
            registry.enroll_device("gw-1")
            outcomes.append("enrolled")
        except DuplicateError:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=enroll) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate"] * 5 + ["enrolled"]


def test_enroll_validates_device_id(registry: Registry) -> None:
    with pytest.raises(TopicError):
        registry.enroll_device("bad/id")
    device = registry.enroll_device("gw-1", hardware_class="rpi4", tags=("lab", "eu"))
    assert device.tags == ("lab", "eu")
    assert device.hardware_class == "rpi4"
    assert device.online is False
    assert device.enrolled_at.tzinfo is not None
    assert [d.id for d in registry.list_devices()] == ["gw-1"]


def test_record_reported_for_unknown_device_writes_nothing(registry: Registry) -> None:
    assert registry.record_reported(make_report("ghost")) is False
    assert registry.get_device("ghost") is None
    assert registry.list_devices() == []


def test_record_reported_updates_device(registry: Registry) -> None:
    registry.enroll_device("gw-1", hardware_class="rpi4")
    active = ModelRef("clf", "1.0", 3, "clf/1.0/rpi4.tar")
    error = ErrorInfo("smoke_mismatch", "outputs differ")
    assert registry.record_reported(
        make_report(
            "gw-1", state=AgentState.FAILED, active=active, error=error, hardware_class="rpi4"
        )
    )
    device = registry.get_device("gw-1")
    assert device is not None
    assert (device.state, device.arch, device.cpu_features, device.runtimes) == (
        "failed",
        "aarch64",
        ("neon",),
        ("onnxruntime",),
    )
    assert (device.active_model, device.active_version, device.active_release) == ("clf", "1.0", 3)
    assert device.last_error == error
    assert device.last_seen is not None
    assert device.reported is not None
    assert device.reported["future_field"] == 7
    assert device.reported["active"]["target"] == "clf/1.0/rpi4.tar"
    assert device.online is False  # only the status channel says online

    # A clean report clears the error and the active model.
    assert registry.record_reported(make_report("gw-1"))
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.last_error is None
    assert device.active_version is None


def test_late_older_report_does_not_overwrite_a_newer_one(registry: Registry) -> None:
    registry.enroll_device("gw-1")
    active = ModelRef("clf", "1.0", 3, "clf/1.0/generic.tar")
    newer = replace(make_report("gw-1", active=active), updated_at=200.0)
    older = replace(make_report("gw-1", state=AgentState.INSTALLING), updated_at=100.0)
    assert registry.record_reported(newer)
    # Shared subscriptions let two controllers store one device's reports out of order.
    assert registry.record_reported(older)
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.state == "idle"
    assert device.active_version == "1.0"
    assert registry.record_reported(replace(older, updated_at=300.0))
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.state == "installing"


def test_set_online(registry: Registry) -> None:
    assert registry.set_online("ghost", True) is False
    registry.enroll_device("gw-1")
    assert registry.set_online("gw-1", True) is True
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.online is True
    assert device.last_seen is not None
    assert registry.set_online("gw-1", False) is True
    device = registry.get_device("gw-1")
    assert device is not None
    assert device.online is False
