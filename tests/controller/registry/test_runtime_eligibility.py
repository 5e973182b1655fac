"""The controller never sends a device a bundle for a runtime it lacks (issue 12).

Real registry (SQLite, and PostgreSQL when configured); devices report their
hardware exactly as the ingest worker stores it.
"""

from __future__ import annotations

import pytest

from edgefleet.controller.errors import NoMatchingBundleError
from edgefleet.controller.registry import Registry
from edgefleet.protocols.messages import AgentState, HardwareInfo, ReportedState
from tests.controller.registry.builders import make_bundle, make_version


def _report(
    registry: Registry, device_id: str, runtimes: tuple[str, ...], hardware_class: str = "rpi4"
) -> None:
    registry.record_reported(
        ReportedState(
            device_id=device_id,
            state=AgentState.IDLE,
            active=None,
            hardware=HardwareInfo("aarch64", ("asimd",), runtimes, hardware_class),
        )
    )


def test_falls_through_to_generic_for_a_runtime_the_device_has(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "rpi4", runtime="onnxruntime")  # own class, wrong runtime
    generic_tflite = make_bundle(registry, mv, "generic", runtime="tflite")
    registry.enroll_device("tfl-1", hardware_class="rpi4")
    _report(registry, "tfl-1", ("tflite",))

    deployment = registry.create_deployment(mv.id, ["tfl-1"])

    assert deployment.targets[0].bundle_id == generic_tflite.id
    desired = registry.desired_for("tfl-1")
    assert desired is not None and desired.model is not None
    assert desired.model.target == generic_tflite.target_path


def test_no_bundle_for_its_runtimes_is_refused_with_the_reason(registry: Registry) -> None:
    mv = make_version(registry)
    make_bundle(registry, mv, "rpi4", runtime="onnxruntime")
    make_bundle(registry, mv, "generic", runtime="onnxruntime")
    registry.enroll_device("tfl-1", hardware_class="rpi4")
    registry.enroll_device("onnx-1", hardware_class="rpi4")
    _report(registry, "tfl-1", ("tflite",))
    _report(registry, "onnx-1", ("onnxruntime",))

    with pytest.raises(NoMatchingBundleError) as info:
        registry.create_deployment(mv.id, ["onnx-1", "tfl-1"])

    message = str(info.value)
    assert "tfl-1 (rpi4): no bundle for runtimes [tflite]" in message
    assert "it has bundles for: onnxruntime" in message
    assert "onnx-1" not in message
    # All or nothing, as for a missing hardware class: nobody was sent anything.
    assert registry.desired_for("tfl-1") is None
    assert registry.desired_for("onnx-1") is None
    assert registry.list_deployments() == []
    # The compatible device alone deploys.
    assert registry.create_deployment(mv.id, ["onnx-1"]).targets[0].device_id == "onnx-1"


def test_unreported_runtimes_keep_the_class_order(registry: Registry) -> None:
    mv = make_version(registry)
    tflite = make_bundle(registry, mv, "rpi4", runtime="tflite")
    make_bundle(registry, mv, "generic", runtime="onnxruntime")
    registry.enroll_device("new-1", hardware_class="rpi4")  # has not reported yet

    deployment = registry.create_deployment(mv.id, ["new-1"])

    assert deployment.targets[0].bundle_id == tflite.id


def test_a_report_retargets_only_to_a_runtime_the_device_has(registry: Registry) -> None:
    """Deployed before it reported, a device moves to its own class's bundle only if it fits."""
    mv = make_version(registry)
    generic = make_bundle(registry, mv, "generic", runtime="tflite")
    make_bundle(registry, mv, "rpi4", runtime="onnxruntime")
    registry.enroll_device("tfl-1")  # enrolled as generic, not reported yet
    registry.create_deployment(mv.id, ["tfl-1"])
    before = registry.desired_for("tfl-1")
    assert before is not None and before.model is not None
    assert before.model.target == generic.target_path

    _report(registry, "tfl-1", ("tflite",), hardware_class="rpi4")  # class changes: re-target

    after = registry.desired_for("tfl-1")
    assert after is not None and after.model is not None
    assert after.model.target == generic.target_path  # not the rpi4 ONNX bundle
    assert after.generation == before.generation
