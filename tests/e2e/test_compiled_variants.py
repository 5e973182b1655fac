"""Compiled variants reach the right devices: one deployment, a variant per profile."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgefleet.controller.bundle import build_bundle, default_sample, inspect_onnx
from edgefleet.controller.catalog import register_compiled
from edgefleet.controller.compiler import BUILTIN_PROFILES, Profile, match_profile
from edgefleet.controller.demo_model import build_demo_model, demo_inputs
from edgefleet.protocols.bundle import BundleManifest, TargetCustom
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import MODEL, Harness, infer, wait_for


def _manifest(agent: object) -> BundleManifest:
    record = agent.slots.active()  # type: ignore[attr-defined]
    assert record is not None
    return BundleManifest.decode((record.path / "manifest.json").read_bytes())


# A class an operator defines in a profiles file: any CPU, float only. It is
# less specific than every architecture profile, so only a device pinned to it
# gets it.
PORTABLE = Profile(
    name="portable",
    runtime="onnxruntime",
    arch="any",
    cpu_features=frozenset(),
    precisions=("fp32", "fp16"),
    max_bundle_bytes=None,
    objective="latency",
    description="float builds for any CPU",
)


def test_two_profiles_one_deployment_each_agent_runs_its_variant(
    tmp_path: Path, broker: BrokerSettings
) -> None:
    # An unpinned agent reports this machine's hardware: the profile the
    # controller must match for it is the one this machine's report matches.
    here = match_profile(detect_hardware())
    if here.arch == "any":
        pytest.skip(f"no architecture profile fits this machine (it matches {here.name})")
    harness = Harness(
        tmp_path,
        broker,
        f"sqlite:///{tmp_path / 'registry.db'}",
        profiles={**BUILTIN_PROFILES, PORTABLE.name: PORTABLE},
    )
    try:
        compiled = register_compiled(
            harness.registry,
            harness.repository,
            build_demo_model(),
            name=MODEL,
            version="1.0",
            profiles=[here, PORTABLE],
            calibration=demo_inputs(32, seed=3),
            validation=demo_inputs(200, seed=2),
            latency_iterations=10,
        )
        assert {b.hardware_class for b in compiled.bundles} == {"generic", here.name, "portable"}
        assert all(b.report for b in compiled.bundles if b.hardware_class != "generic")

        harness.enroll("gw-auto")
        harness.enroll("gw-pinned", hardware_class="portable")
        auto = harness.start_agent(harness.agent_config("gw-auto"))
        # An operator pinned this device's class: it runs the portable variant.
        pinned = harness.start_agent(harness.agent_config("gw-pinned", hardware_class="portable"))
        wait_for(
            lambda: (
                harness.summary("gw-auto").profile == here.name
                and harness.summary("gw-pinned").profile == "portable"
            ),
            what="profiles matched",
        )

        harness.deploy("1.0", "gw-auto", "gw-pinned")
        harness.wait_active(auto, "1.0")
        harness.wait_active(pinned, "1.0")
        assert _manifest(auto).hardware_class == here.name
        assert _manifest(pinned).hardware_class == "portable"
        expected = {b.hardware_class: b.precision for b in compiled.bundles}
        assert _manifest(auto).precision == expected[here.name]
        assert _manifest(pinned).precision == expected["portable"]
        assert infer(auto)["model"]["version"] == "1.0"
        assert infer(pinned)["model"]["version"] == "1.0"
    finally:
        harness.close()


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
