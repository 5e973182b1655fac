"""Rollouts skip devices no bundle fits, with the reason, instead of failing them (issue 12).

Real registry (SQLite, and PostgreSQL when configured). A TFLite-only device
in a rollout of a version with ONNX bundles only is not a member: it is logged
as ``skipped`` (``no bundle for runtimes [tflite]``), never sent a desired
state, and neither takes a canary slot nor counts as a failure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefleet.controller.catalog import register_model
from edgefleet.controller.cli import cli
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import Registry
from edgefleet.controller.rollout.engine import DeviceState, RolloutConfig, RolloutStatus
from edgefleet.controller.rollout.runner import sign_reissue
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.messages import (
    AgentState,
    HardwareInfo,
    LatencySummary,
    ModelRef,
    ReportedState,
    Telemetry,
)

CFG = RolloutConfig(
    canary_count=1,
    base_rate=2,
    max_rate=4,
    max_in_flight=4,
    soak_s=0,
    observe_s=0,
    device_timeout_s=60,
    min_executed=1,
    failure_threshold_pct=0.0,
)


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    r = Registry(database_url)
    yield r
    r.close()


@pytest.fixture
def repo(tmp_path: Path) -> TrustRepository:
    return TrustRepository.init(tmp_path / "repository")


def _report(
    registry: Registry,
    device_id: str,
    runtimes: tuple[str, ...],
    active: ModelRef | None = None,
    *,
    deployment: str | None = None,
    generation: int = 0,
) -> None:
    registry.record_reported(
        ReportedState(
            device_id=device_id,
            state=AgentState.IDLE,
            active=active,
            hardware=HardwareInfo("aarch64", runtimes=runtimes),
            generation=generation,
            deployment_id=deployment,
        )
    )


def _step(store: RolloutStore, repo: TrustRepository, rollout_id: str) -> None:
    store.step(rollout_id, lambda r: sign_reissue(repo, r))


def test_a_device_without_the_runtime_is_skipped_not_failed(
    registry: Registry, repo: TrustRepository
) -> None:
    onnx_only = register_model(registry, repo, build_demo_model(), name="m", version="1.0")
    assert {b.runtime for b in onnx_only.bundles} == {"onnxruntime"}
    # "a-tfl" sorts first: were it a member, it would be the canary.
    for device_id, runtimes in (("a-tfl", ("tflite",)), ("b-onnx", ("onnxruntime",))):
        registry.enroll_device(device_id, tags=["gw"])
        registry.set_online(device_id, True)
        _report(registry, device_id, runtimes)
    store = RolloutStore(registry)

    info = store.create("m", "1.0", Selector(tags=("gw",)), CFG)

    assert [d.device_id for d in store.devices(info.id)] == ["b-onnx"]
    skipped = [d for d in store.decisions(info.id) if d.kind == "skipped"]
    assert [(d.device_id, d.reason) for d in skipped] == [
        ("a-tfl", "not eligible: no bundle for runtimes [tflite] (it has bundles for: onnxruntime)")
    ]
    assert info.skipped == {
        "a-tfl": "not eligible: no bundle for runtimes [tflite] (it has bundles for: onnxruntime)"
    }
    started = next(d for d in store.decisions(info.id) if d.kind == "started")
    assert "1 device(s) selected" in started.reason and "1 not eligible" in started.reason

    _step(store, repo, info.id)
    _step(store, repo, info.id)  # a dynamic rollout re-checks a-tfl each step...
    assert [d.kind for d in store.decisions(info.id)].count("skipped") == 1  # ...logs it once
    assert registry.desired_for("a-tfl") is None
    desired = registry.desired_for("b-onnx")
    assert desired is not None and desired.model is not None
    assert desired.model.target == onnx_only.bundles[0].target_path
    # The canary installs; the rollout completes without the TFLite device failing it.
    _report(
        registry,
        "b-onnx",
        ("onnxruntime",),
        desired.model,
        deployment=info.id,
        generation=desired.generation,
    )
    _step(store, repo, info.id)  # observing
    registry.add_telemetry(
        [Telemetry("b-onnx", 1.0, 20, 0, LatencySummary(1.0, 2.0, 2.0), desired.model, 1, 0.0)]
    )
    for _ in range(2):
        _step(store, repo, info.id)
    got = store.get(info.id)
    assert got.status is RolloutStatus.COMPLETED, got.reason
    assert got.counts == {"updated": 1}
    assert registry.desired_for("a-tfl") is None

    # Once the gateway reports a runtime that fits, the dynamic rollout takes it in.
    _report(registry, "a-tfl", ("tflite", "onnxruntime"))
    _step(store, repo, info.id)
    states = {d.device_id: d.state for d in store.devices(info.id)}
    assert states["a-tfl"] is DeviceState.IN_FLIGHT
    assert store.get(info.id).skipped == {}  # a member now
    assert registry.desired_for("a-tfl") is not None


def test_runtimes_reported_after_joining_cancel_the_start_without_a_failure(
    registry: Registry, repo: TrustRepository
) -> None:
    register_model(registry, repo, build_demo_model(), name="m", version="1.0")
    registry.enroll_device("late", tags=["gw"])
    registry.set_online("late", True)  # has not reported its hardware yet: a member
    store = RolloutStore(registry)
    info = store.create("m", "1.0", Selector(devices=("late",)), CFG)
    assert [d.device_id for d in store.devices(info.id)] == ["late"]

    _report(registry, "late", ("tflite",))
    _step(store, repo, info.id)

    [device] = store.devices(info.id)
    assert device.state is DeviceState.CANCELLED
    assert device.reason.startswith("not eligible: no bundle for runtimes [tflite]")
    assert registry.desired_for("late") is None
    _step(store, repo, info.id)
    got = store.get(info.id)
    # failure_threshold_pct=0: a single failure would have halted the rollout.
    assert got.status is RolloutStatus.COMPLETED, got.reason


def test_cli_shows_the_skipped_device_and_why(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(f'home = "{tmp_path / "state"}"\ndatabase_url = "{database_url}"\n')

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("init")
    registry = Registry(database_url)
    try:
        repo = TrustRepository.open(tmp_path / "state" / "repository")
        register_model(registry, repo, build_demo_model(), name="m", version="1.0")
        for device_id, runtimes in (("gw-tfl", ("tflite",)), ("gw-onnx", ("onnxruntime",))):
            registry.enroll_device(device_id, tags=["gw"])
            _report(registry, device_id, runtimes)
    finally:
        registry.close()

    created = json.loads(run("rollout", "create", "m", "1.0", "--tag", "gw", "--json"))
    assert list(created["skipped"]) == ["gw-tfl"]
    assert created["counts"] == {"pending": 1}
    text = run("rollout", "show", created["id"])
    assert "skipped gw-tfl: not eligible: no bundle for runtimes [tflite]" in text
