"""Staged rollouts end to end: real broker, real registry, real agents over MQTT.

Every agent here is the real agent code path in this process, with its own
MQTT connection, TUF client, slots and HTTP endpoint; the controller steps
rollouts in its service loop exactly as ``edgefleet serve`` does.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.error
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.daemon import Agent
from edgefleet.controller.bundle import default_sample, inspect_onnx
from edgefleet.controller.catalog import register_model
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import CLASSES, FEATURES, build_demo_model
from edgefleet.controller.registry import Registry
from edgefleet.controller.rollout.engine import DeviceState, RolloutConfig, RolloutStatus
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.shared.link import BrokerSettings
from tests.conftest import POSTGRES_URL
from tests.e2e.harness import MODEL, Harness, infer, wait_for
from tests.support import postgres_schema

pytestmark = pytest.mark.slow

FAST = {
    "canary_count": 2,
    "base_rate": 4,
    "increment_factor": 2.0,
    "max_rate": 8,
    "max_in_flight": 8,
    "soak_s": 0.5,
    "observe_s": 1.5,
    "device_timeout_s": 30.0,
    "failure_threshold_pct": 10.0,
    "timeout_threshold_pct": 10.0,
    "min_executed": 4,
    "p95_slack_ms": 50.0,
}


def batch_of_one_model(seed: int = 5) -> bytes:
    """A model that works for a batch of one and raises for any larger batch.

    Its smoke test (a batch of one) passes, so it installs everywhere; then
    real traffic with batches of two fails inside the runtime: a bad model
    only telemetry can catch.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (FEATURES, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["features", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "batch1",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        [
            numpy_helper.from_array(np.array([1, FEATURES], dtype=np.int64), "shape"),
            numpy_helper.from_array(w, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def fleet_harness(tmp_path: Path, embedded_broker: BrokerSettings) -> Iterator[Harness]:
    h = Harness(
        tmp_path,
        embedded_broker,
        f"sqlite:///{tmp_path / 'registry.db'}",
        rollout_interval_s=0.3,
    )
    yield h
    h.close()


class Traffic:
    """Inference requests to every agent, in the background: batches of one and two."""

    def __init__(self, agents: list[Agent]) -> None:
        self.agents = agents
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for agent in list(self.agents):
                for rows in (1, 2):
                    try:
                        infer(agent, [[0.1] * FEATURES] * rows)
                    except (urllib.error.URLError, OSError, AssertionError):
                        pass  # a 500 from a bad model is what telemetry must show
            self.stop.wait(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def start_fleet(h: Harness, n: int, tag: str = "fleet") -> list[Agent]:
    ids = [h.device_id(f"gw{i:02d}") for i in range(n)]
    for device_id in ids:
        h.registry.enroll_device(device_id, tags=[tag])
    agents = [h.start_agent(h.agent_config(f"gw{i:02d}")) for i in range(n)]
    online = set(ids)
    wait_for(
        lambda: {d.id for d in h.registry.list_devices() if d.online} >= online,
        30,
        "agents online",
    )
    return agents


def wait_status(
    store: RolloutStore, rollout_id: str, *statuses: RolloutStatus, timeout_s: float = 90
) -> None:
    wait_for(
        lambda: store.get(rollout_id).status in statuses,
        timeout_s,
        f"rollout to become {', '.join(s.value for s in statuses)}"
        f" (is {store.get(rollout_id).status.value}: {store.get(rollout_id).counts})",
    )


def started_once(store: RolloutStore, rollout_id: str) -> Counter[str]:
    starts = Counter(
        d.device_id for d in store.decisions(rollout_id) if d.kind == "device_in_flight"
    )
    assert all(n == 1 for n in starts.values()), starts
    return starts


def test_waves_then_a_bad_model_halts_after_the_canary_and_rolls_back(
    fleet_harness: Harness,
) -> None:
    h = fleet_harness
    store = RolloutStore(h.registry, actor="test")
    h.register("1.0")
    h.register("2.0", build_demo_model(seed=1))
    agents = start_fleet(h, 20)
    h.deploy("1.0", *[f"gw{i:02d}" for i in range(20)])
    for agent in agents:
        h.wait_active(agent, "1.0", timeout_s=60)

    with Traffic(agents):
        # A good model goes out in waves: canary 2, then 4, 8, and the last 6.
        good = store.create(MODEL, "2.0", Selector(tags=("fleet",)), RolloutConfig(**FAST))
        wait_status(store, good.id, RolloutStatus.COMPLETED, RolloutStatus.HALTED)
        info = store.get(good.id)
        assert info.status is RolloutStatus.COMPLETED, store.decisions(good.id)
        assert info.counts == {"updated": 20}
        assert [(w.wave, w.devices) for w in store.waves(good.id)] == [
            (0, 2),
            (1, 4),
            (2, 8),
            (3, 6),
        ]
        assert len(started_once(store, good.id)) == 20
        assert all(d.observed_requests for d in store.devices(good.id))
        assert {infer(a)["model"]["version"] for a in agents} == {"2.0"}

        # A model that raises on batches of two: the canary catches it.
        inputs, _ = inspect_onnx(batch_of_one_model())
        register_model(
            h.registry,
            h.repository,
            batch_of_one_model(),
            name=MODEL,
            version="3.0",
            sample_inputs=default_sample(inputs, batch=1),
        )
        installs_before = {a.device_id: a.installs for a in agents}
        bad = store.create(
            MODEL, "3.0", Selector(tags=("fleet",)), RolloutConfig(**{**FAST, "canary_count": 3})
        )
        wait_status(store, bad.id, RolloutStatus.HALTED)
        wait_for(
            lambda: store.get(bad.id).counts.get("rolled_back") == 3,
            60,
            f"canary rolled back ({store.get(bad.id).counts})",
        )

    info = store.get(bad.id)
    assert info.counts == {"rolled_back": 3, "cancelled": 17}
    assert "of the canary failed" in info.reason
    canary = {d.device_id for d in store.devices(bad.id) if d.wave == 0}
    assert set(started_once(store, bad.id)) == canary
    failures = [d for d in store.decisions(bad.id) if d.kind == "device_failed"]
    assert len(failures) == 3 and all("error rate" in d.reason for d in failures)
    for agent in agents:
        active = agent.active_model
        assert active is not None and active.version == "2.0"
        if agent.device_id in canary:
            # Back on 2.0 under a re-issued, newer release, from the kept slot.
            assert active.release > info.release
            assert agent.installs == installs_before[agent.device_id] + 2
            events = h.registry.events_for(agent.device_id, limit=5)
            installed = next(e for e in events if e.kind == "installed")
            assert installed.detail is not None
            assert installed.detail["extra"]["downloaded"] is False
        else:
            assert agent.installs == installs_before[agent.device_id]
    story = [d.kind for d in store.decisions(bad.id)]
    assert story[:3] == ["created", "started", "wave_started"]
    assert "halted" in story and story.count("device_rolled_back") == 3


def test_controller_restart_offline_device_and_timeout(
    fleet_harness: Harness, tmp_path: Path
) -> None:
    h = fleet_harness
    store = RolloutStore(h.registry, actor="test")
    h.register("1.0")
    agents = start_fleet(h, 6)
    late = h.device_id("late")
    h.registry.enroll_device(late, tags=["fleet"])  # offline until later
    ghost = h.device_id("ghost")
    h.registry.enroll_device(ghost, tags=["fleet"])
    h.registry.set_online(ghost, True)  # says it is online but never installs: a timeout

    config = RolloutConfig(
        **{
            **FAST,
            "canary_count": 2,
            "base_rate": 2,
            "max_rate": 2,
            "device_timeout_s": 4.0,
            "timeout_threshold_pct": 50.0,
            "soak_s": 1.0,
        }
    )
    rollout = store.create(MODEL, "1.0", Selector(tags=("fleet",)), config)
    wait_for(lambda: store.get(rollout.id).counts.get("updated", 0) >= 2, 60, "canary updated")

    # Kill the controller mid-rollout (no goodbye) and start a fresh one on the same state.
    h.service._stop.set()
    h.service.link.stop(clean=False)
    for t in h.service._threads:
        t.join(10)
    mid = store.get(rollout.id)
    assert mid.status is RolloutStatus.RUNNING
    h.service = ControllerService(
        h.registry,
        h.repository,
        h.broker,
        ServiceSettings(
            client_id=f"e2e-controller2-{h.token}",
            maintenance_interval_s=0.5,
            ingest_flush_s=0.1,
            rollout_interval_s=0.3,
        ),
    )
    h.service.start()

    wait_for(
        lambda: store.get(rollout.id).counts.get("updated", 0) == 6,
        90,
        f"all online agents updated ({store.get(rollout.id).counts})",
    )
    wait_for(lambda: store.get(rollout.id).counts.get("timed_out") == 1, 60, "ghost timed out")
    timed_out = [d for d in store.devices(rollout.id) if d.state is DeviceState.TIMED_OUT]
    assert [d.device_id for d in timed_out] == [ghost]
    assert "not finished within 4s" in timed_out[0].reason
    assert store.get(rollout.id).status is RolloutStatus.RUNNING  # `late` is still pending

    # The offline device comes back and catches up within the same rollout.
    late_agent = h.start_agent(h.agent_config("late"))
    h.wait_active(late_agent, "1.0", timeout_s=60)
    wait_status(store, rollout.id, RolloutStatus.COMPLETED)
    final = store.get(rollout.id)
    assert final.counts == {"updated": 7, "timed_out": 1}
    starts = started_once(store, rollout.id)
    assert len(starts) == 8
    actors = {d.actor for d in store.decisions(rollout.id) if d.kind == "device_in_flight"}
    assert len(actors) == 2, "both controllers took steps"
    assert all(a.installs == 1 for a in agents)


@pytest.mark.postgres
@pytest.mark.mosquitto
def test_two_controllers_share_one_rollout_and_take_each_step_once(
    tmp_path: Path, mosquitto: BrokerSettings
) -> None:
    if not POSTGRES_URL:
        pytest.skip("EDGEFLEET_TEST_DATABASE_URL not set")
    schema_url = contextlib.ExitStack()
    url = schema_url.enter_context(postgres_schema(POSTGRES_URL))
    h = Harness(tmp_path, mosquitto, url, rollout_interval_s=0.2, share_group="edgefleet")
    second_registry = Registry(url)
    second = ControllerService(
        second_registry,
        TrustRepository.open(tmp_path / "repository"),
        mosquitto,
        ServiceSettings(
            client_id=f"e2e-controller-b-{h.token}",
            maintenance_interval_s=0.5,
            ingest_flush_s=0.1,
            rollout_interval_s=0.2,
            share_group="edgefleet",
        ),
    )
    second.start()
    try:
        store = RolloutStore(h.registry, actor="test")
        h.register("1.0")
        agents = start_fleet(h, 10)
        config = RolloutConfig(**{**FAST, "canary_count": 2, "base_rate": 2, "max_rate": 4})
        rollout = store.create(MODEL, "1.0", Selector(tags=("fleet",)), config)
        wait_status(store, rollout.id, RolloutStatus.COMPLETED, RolloutStatus.HALTED)
        story = "\n".join(
            f"{d.kind} {d.device_id} {d.actor}: {d.reason}" for d in store.decisions(rollout.id)
        )
        assert store.get(rollout.id).counts == {"updated": 10}, story
        assert len(started_once(store, rollout.id)) == 10
        decisions = store.decisions(rollout.id)
        # Every engine step is taken exactly once: one start and one verdict per
        # device, and one start per wave, whichever controller took it.
        for kind in ("device_observing", "device_updated"):
            per_device = Counter(d.device_id for d in decisions if d.kind == kind)
            assert sorted(per_device.values()) == [1] * 10, (kind, per_device)
        waves = Counter(d.wave for d in decisions if d.kind == "wave_started")
        assert set(waves.values()) == {1}, waves
        actors = {d.actor for d in decisions if d.actor != "test"}
        assert actors == {h.service.settings.client_id, second.settings.client_id}
        assert all(a.installs == 1 for a in agents)
        # Shared subscriptions split ingestion between the two controllers.
        assert h.service.ingested > 0 and second.ingested > 0
    finally:
        second.stop()
        second_registry.close()
        h.close()
        schema_url.close()
