"""The agent daemon against a real controller service, both on one in-memory broker.

A real round trip in one process: the service publishes a desired state, the
agent fetches the signed bundle over block transfers, verifies it with TUF,
installs and serves it, and reports back. The end-to-end tests run the same
over amqtt and Mosquitto with more agents and failure modes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig, HttpSettings
from edgefleet.agent.daemon import Agent
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.catalog import register_model
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.messages import DesiredState
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.memlink import MemoryBroker


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


@dataclass
class Fleet:
    tmp: Path
    broker: MemoryBroker
    registry: Registry
    repository: TrustRepository
    service: ControllerService
    root_file: Path

    def agent(self, device_id: str) -> Agent:
        self.registry.enroll_device(device_id, hardware_class="generic")
        config = AgentConfig(
            device_id=device_id,
            state_dir=self.tmp / "agents" / device_id,
            trust_root=self.root_file,
            telemetry_interval_s=0.5,
            retry_backoff_s=0.5,
            http=HttpSettings(port=0),
            transfer=TransferSettings(request_timeout_s=2.0, max_attempts=3),
        )
        return Agent(config, links=self.broker.link)

    def register(self, version: str) -> None:
        register_model(
            self.registry,
            self.repository,
            build_demo_model(),
            name="m",
            version=version,
            hardware_classes=("generic",),
        )

    def online(self, device_id: str) -> bool | None:
        info = self.registry.get_device(device_id)
        return None if info is None else info.online


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    broker = MemoryBroker()
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    repository = TrustRepository.init(tmp_path / "repository")
    root_file = tmp_path / "root.json"
    root_file.write_bytes(repository.root_bytes())
    service = ControllerService(
        registry,
        repository,
        BrokerSettings(),  # unused: the links come from the in-memory broker
        ServiceSettings(
            client_id="test-controller", maintenance_interval_s=0.2, ingest_flush_s=0.05
        ),
        links=broker.link,
    )
    service.start()
    yield Fleet(tmp_path, broker, registry, repository, service, root_file)
    service.stop()
    broker.close()
    registry.close()


def test_agent_installs_what_the_controller_deploys(fleet: Fleet) -> None:
    fleet.register("1")
    agent = fleet.agent("gw-1")
    agent.start()
    try:
        wait_for(lambda: fleet.online("gw-1") is True, what="gw-1 online")
        deployment = fleet.service.deploy("m", "1", ["gw-1"])
        # installs counts after the model went live: wait for it, not the model.
        wait_for(lambda: agent.installs == 1, what="gw-1 to install version 1")
        assert agent.active_model is not None and agent.active_model.version == "1"
        assert agent.fetcher.blocks_received > 0
        # The controller hears the outcome through the agent's retained report and events.
        wait_for(
            lambda: (
                (info := fleet.registry.get_device("gw-1")) is not None
                and info.active_version == "1"
                and info.state == "idle"
            ),
            what="registry to show gw-1 running version 1",
        )
        wait_for(
            lambda: (
                {"download_started", "verified", "installed"}
                <= {e.kind for e in fleet.registry.events_for("gw-1")}
            ),
            what="the install's events in the registry",
        )
        assert fleet.registry.get_deployment(deployment.id).id == deployment.id
    finally:
        agent.stop()
    wait_for(lambda: fleet.online("gw-1") is False, what="gw-1 offline after a clean stop")


def test_a_crashed_agent_goes_offline_by_its_last_will(fleet: Fleet) -> None:
    agent = fleet.agent("gw-1")
    agent.start()
    wait_for(lambda: fleet.online("gw-1") is True, what="gw-1 online")
    agent.stop(clean=False)
    wait_for(lambda: fleet.online("gw-1") is False, what="gw-1 offline by its will")


def test_agent_refuses_desired_states_it_should_not_act_on(fleet: Fleet) -> None:
    agent = fleet.agent("gw-1")
    agent.start()
    try:
        wait_for(lambda: agent.link.connected)
        intruder = fleet.broker.link("intruder")
        intruder.start()
        desired = str(DeviceTopic("gw-1", Channel.DESIRED))
        intruder.publish(desired, b"\xff not json", qos=1)
        intruder.publish(desired, DesiredState("gw-2", 1, None).encode(), qos=1)
        wait_for(
            lambda: {"malformed_desired", "wrong_device"} <= set(agent.rejections.snapshot()),
            what="both refusals counted",
        )
        assert agent.installs == 0
    finally:
        agent.stop()


def test_after_a_broker_restart_both_sides_resend_their_state(fleet: Fleet) -> None:
    fleet.register("1")
    agent = fleet.agent("gw-1")
    agent.start()
    try:
        fleet.service.deploy("m", "1", ["gw-1"])
        wait_for(lambda: agent.installs == 1, what="first install")
        desired = str(DeviceTopic("gw-1", Channel.DESIRED))
        status = str(DeviceTopic("gw-1", Channel.STATUS))
        fleet.broker.restart()  # every retained message is gone
        # The controller re-publishes desired states, the agent its status,
        # from their on_connect hooks; the agent does not install again.
        wait_for(lambda: fleet.broker.retained(desired) is not None, what="desired re-sent")
        wait_for(lambda: fleet.broker.retained(status) == b"online", what="status re-sent")
        time.sleep(0.5)
        assert agent.installs == 1
        assert agent.active_model is not None and agent.active_model.version == "1"
    finally:
        agent.stop()


def test_agent_state_dir_is_owner_only_whatever_the_umask(fleet: Fleet) -> None:
    """Issue 9 item 10: the state dir was 0755 (slots, releases) unless systemd set a umask."""
    import os
    import stat

    state_dir = fleet.tmp / "agents" / "gw-perm"
    state_dir.mkdir(parents=True, mode=0o755)  # e.g. made by an installer, or an old version
    state_dir.chmod(0o755)
    old = os.umask(0)
    try:
        agent = fleet.agent("gw-perm")
    finally:
        os.umask(old)
    assert agent.config.state_dir == state_dir
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
