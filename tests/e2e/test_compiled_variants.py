"""Compiled variants reach the right devices: one deployment, a variant per profile."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgefleet.controller.bundle import build_bundle, default_sample, inspect_onnx
from edgefleet.controller.catalog import register_compiled
from edgefleet.controller.compiler import BUILTIN_PROFILES
from edgefleet.controller.demo_model import build_demo_model, demo_inputs
from edgefleet.protocols.bundle import BundleManifest, TargetCustom
from tests.e2e.harness import MODEL, Harness, infer, wait_for


def _manifest(agent: object) -> BundleManifest:
    record = agent.slots.active()  # type: ignore[attr-defined]
    assert record is not None
    return BundleManifest.decode((record.path / "manifest.json").read_bytes())


def test_two_profiles_one_deployment_each_agent_runs_its_variant(harness: Harness) -> None:
    profiles = [BUILTIN_PROFILES["x86-vnni"], BUILTIN_PROFILES["x86-avx2"]]
    compiled = register_compiled(
        harness.registry,
        harness.repository,
        build_demo_model(),
        name=MODEL,
        version="1.0",
        profiles=profiles,
        calibration=demo_inputs(32, seed=3),
        validation=demo_inputs(200, seed=2),
        latency_iterations=10,
    )
    assert {b.hardware_class for b in compiled.bundles} == {"generic", "x86-vnni", "x86-avx2"}
    assert all(b.report for b in compiled.bundles if b.hardware_class != "generic")

    harness.enroll("gw-vnni")
    harness.enroll("gw-avx2", hardware_class="x86-avx2")
    vnni = harness.start_agent(harness.agent_config("gw-vnni"))
    # An operator pinned this device's class: it matches the avx2 profile.
    avx2 = harness.start_agent(harness.agent_config("gw-avx2", hardware_class="x86-avx2"))
    wait_for(
        lambda: (
            harness.summary("gw-vnni").profile == "x86-vnni"
            and harness.summary("gw-avx2").profile == "x86-avx2"
        ),
        what="profiles matched",
    )

    harness.deploy("1.0", "gw-vnni", "gw-avx2")
    harness.wait_active(vnni, "1.0")
    harness.wait_active(avx2, "1.0")
    assert _manifest(vnni).hardware_class == "x86-vnni"
    assert _manifest(avx2).hardware_class == "x86-avx2"
    expected = {b.hardware_class: b.precision for b in compiled.bundles}
    assert _manifest(vnni).precision == expected["x86-vnni"]
    assert _manifest(avx2).precision == expected["x86-avx2"]
    assert infer(vnni)["model"]["version"] == "1.0"
    assert infer(avx2)["model"]["version"] == "1.0"


def test_device_deployed_before_reporting_is_retargeted_to_its_variant(harness: Harness) -> None:
    register_compiled(
        harness.registry,
        harness.repository,
        build_demo_model(),
        name=MODEL,
        version="1.0",
        profiles=[BUILTIN_PROFILES["x86-avx2"]],
        calibration=demo_inputs(32, seed=3),
        validation=demo_inputs(200, seed=2),
        latency_iterations=10,
    )
    harness.enroll("gw-new", hardware_class="x86-avx2")
    deployment = harness.service.deploy(MODEL, "1.0", [harness.device_id("gw-new")])
    # Before the device ever reported, only its enrolled class was known.
    first_target = deployment.targets[0].model.target
    agent = harness.start_agent(harness.agent_config("gw-new", hardware_class="x86-avx2"))
    wait_for(
        lambda: (
            agent.active_model is not None
            and agent.active_model.target.endswith(".bundle")
            and _manifest(agent).hardware_class == "x86-avx2"
        ),
        what="the avx2 variant",
    )
    assert first_target.startswith(f"{MODEL}/1.0/")


def test_tflite_model_deploys_and_serves(harness: Harness) -> None:
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")
    model = (Path(__file__).parents[1] / "fixtures" / "tiny_classifier.tflite").read_bytes()
    registered = harness.register("1.0", model)
    assert registered.bundles[0].runtime == "tflite"
    harness.enroll("gw-lite")
    agent = harness.start_agent(harness.agent_config("gw-lite"))
    harness.deploy("1.0", "gw-lite")
    harness.wait_active(agent, "1.0")
    assert _manifest(agent).runtime == "tflite"
    body = json.dumps({"inputs": {"image": np.zeros((2, 8, 8, 1)).tolist()}}).encode()
    request = urllib.request.Request(
        f"{agent.server.url}/v1/infer", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result = json.loads(response.read())
    assert np.asarray(result["outputs"]["probs"]).shape == (2, 4)


def test_signed_cpu_requirements_override_a_matching_class_label(harness: Harness) -> None:
    """A bundle labelled for this device's class but signed as arm64-only is refused."""
    model = build_demo_model()
    inputs, outputs = inspect_onnx(model)
    info = harness.registry.register_model_version(
        MODEL, "1.0", source_sha256="0" * 64, inputs=inputs, outputs=outputs
    )
    data, _ = build_bundle(
        model,
        name=MODEL,
        version="1.0",
        release=info.release,
        hardware_class="generic",
        precision="fp32",
        sample_inputs=default_sample(inputs),
    )
    custom = TargetCustom(
        MODEL,
        "1.0",
        info.release,
        "onnxruntime",
        "fp32",
        "generic",
        inputs,
        outputs,
        requires_arch="arm64",
        requires_features=("dotprod",),
    )
    published = harness.repository.add_target(f"{MODEL}/1.0/generic-fp32.bundle", data, custom)
    harness.registry.add_bundle(
        info.id,
        hardware_class="generic",
        runtime="onnxruntime",
        precision="fp32",
        target_path=published.path,
        sha256=published.sha256,
        length=published.length,
    )
    harness.enroll("gw-arm")
    agent = harness.start_agent(harness.agent_config("gw-arm"))
    harness.deploy("1.0", "gw-arm")
    summary = harness.wait_error("gw-arm", "wrong_hardware")
    assert "arm64" in (summary.last_error_message or "")
    assert agent.active_model is None
