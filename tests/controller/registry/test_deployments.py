"""Deployments and the desired-state outbox: bundle choice, generations, publishing marks."""

from __future__ import annotations

import threading

import pytest

from edgefleet.controller.errors import (
    NoMatchingBundleError,
    NotFoundError,
    RegistryError,
)
from edgefleet.controller.registry import Registry
from edgefleet.protocols.messages import (
    Event,
    EventKind,
    ModelRef,
)
from tests.controller.registry.builders import (
    make_bundle,
    make_report,
    make_telemetry,
    make_version,
)


def test_deployment_picks_hardware_class_bundle_then_generic(registry: Registry) -> None:
    mv = make_version(registry)
    rpi = make_bundle(registry, mv, "rpi4")
    generic = make_bundle(registry, mv, "generic")
    registry.enroll_device("pi-1", hardware_class="rpi4")
    registry.enroll_device("jet-1", hardware_class="jetson")

    deployment = registry.create_deployment(mv.id, ["pi-1", "jet-1"])

    targets = {t.device_id: t for t in deployment.targets}
    assert targets["pi-1"].model == ModelRef("clf", "1.0", 1, rpi.target_path)
    assert targets["jet-1"].model == ModelRef("clf", "1.0", 1, generic.target_path)
    assert (targets["pi-1"].bundle_id, targets["jet-1"].bundle_id) == (rpi.id, generic.id)
    assert (deployment.model, deployment.version, deployment.release) == ("clf", "1.0", 1)
    desired = registry.desired_for("jet-1")
    assert desired is not None
    assert desired.model is not None
    assert desired.model.target == generic.target_path
    assert desired.deployment_id == deployment.id
    assert registry.get_deployment(deployment.id) == deployment


def test_deployment_prefers_a_runtime_the_device_has(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "rpi4", runtime="tflite")
    onnx = make_bundle(registry, mv, "rpi4", runtime="onnxruntime")
    registry.enroll_device("pi-1", hardware_class="rpi4")
    registry.record_reported(make_report("pi-1", hardware_class="rpi4"))  # reports onnxruntime
    deployment = registry.create_deployment(mv.id, ["pi-1"])
    assert deployment.targets[0].bundle_id == onnx.id


def test_no_matching_bundle_names_devices_and_changes_nothing(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "rpi4")
    registry.enroll_device("pi-1", hardware_class="rpi4")
    registry.enroll_device("jet-1", hardware_class="jetson")
    with pytest.raises(NoMatchingBundleError, match=r"jet-1 \(jetson\)") as info:
        registry.create_deployment(mv.id, ["pi-1", "jet-1"])
    assert "pi-1" not in str(info.value)
    # All or nothing: the device that did match got no desired state either.
    assert registry.desired_for("pi-1") is None
    assert registry.list_deployments() == []


def test_deployment_to_unknown_device_or_version(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "generic")
    registry.enroll_device("gw-1")
    with pytest.raises(NotFoundError, match="ghost"):
        registry.create_deployment(mv.id, ["gw-1", "ghost"])
    with pytest.raises(NotFoundError):
        registry.create_deployment(mv.id + 100, ["gw-1"])
    with pytest.raises(RegistryError):
        registry.create_deployment(mv.id, [])
    assert registry.desired_for("gw-1") is None


def test_generation_increments_per_deployment(registry: Registry) -> None:
    v1 = make_version(registry, "clf", "1.0")
    v2 = make_version(registry, "clf", "2.0")
    make_bundle(registry, v1, "generic")
    make_bundle(registry, v2, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")

    first = registry.create_deployment(v1.id, ["a", "b"])
    second = registry.create_deployment(v2.id, ["a", "a"])  # duplicates collapse

    assert {t.device_id: t.generation for t in first.targets} == {"a": 1, "b": 1}
    assert [(t.device_id, t.generation) for t in second.targets] == [("a", 2)]
    desired_a = registry.desired_for("a")
    desired_b = registry.desired_for("b")
    assert desired_a is not None
    assert desired_b is not None
    assert (desired_a.generation, desired_a.deployment_id) == (2, second.id)
    assert desired_a.model is not None
    assert (desired_a.model.version, desired_a.model.release) == ("2.0", 2)
    assert (desired_b.generation, desired_b.deployment_id) == (1, first.id)
    assert [d.id for d in registry.list_deployments()] == [second.id, first.id]
    assert [d.device_id for d in registry.all_desired()] == ["a", "b"]


def test_unpublished_and_mark_published(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "generic")
    registry.enroll_device("a")
    registry.enroll_device("b")
    registry.create_deployment(mv.id, ["a", "b"])
    assert [(d.device_id, d.generation) for d in registry.unpublished_desired()] == [
        ("a", 1),
        ("b", 1),
    ]

    registry.mark_published("a", 1)
    assert [d.device_id for d in registry.unpublished_desired()] == ["b"]

    registry.create_deployment(mv.id, ["a"])  # generation 2, not yet published
    registry.mark_published("a", 1)  # a late acknowledgement of the old one
    assert [(d.device_id, d.generation) for d in registry.unpublished_desired()] == [
        ("a", 2),
        ("b", 1),
    ]
    registry.mark_published("a", 2)
    registry.mark_published("a", 1)  # must not lower the mark again
    registry.mark_published("ghost", 5)  # unknown devices are ignored
    assert [d.device_id for d in registry.unpublished_desired()] == ["b"]

    registry.mark_published("b", 7)  # a generation that does not exist yet is ignored
    registry.create_deployment(mv.id, ["b"])
    assert [(d.device_id, d.generation) for d in registry.unpublished_desired()] == [("b", 2)]


def test_concurrent_deployments_and_ingest_do_not_conflict(registry: Registry) -> None:
    # On PostgreSQL, foreign-key checks of ingest batches lock device rows too;
    # a deployment that locked them the wrong way deadlocked against ingest.
    mv = make_version(registry)
    make_bundle(registry, mv, "generic")
    devices = [f"d{i:02d}" for i in range(12)]
    for device_id in devices:
        registry.enroll_device(device_id)
    errors: list[BaseException] = []

    def deploy(k: int) -> None:
        try:
            for i in range(15):
                registry.create_deployment(mv.id, devices[(k + i) % 12 :] + devices[: (k + i) % 12])
        except BaseException as exc:
            errors.append(exc)

    def ingest(k: int) -> None:
        try:
            for i in range(15):
                batch = [
                    make_telemetry(devices[(k * 5 + i + j * 7) % 12], 1, p50=1.0) for j in range(6)
                ]
                registry.add_telemetry(batch)
                registry.add_events([Event(d.device_id, EventKind.VERIFIED) for d in batch])
                registry.record_reported(make_report(devices[(k + i) % 12]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=ingest, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(d.generation for d in registry.all_desired()) == 4 * 15 * 12
    assert registry.fleet_status().inferences == 4 * 15 * 6
