"""The controller service's MQTT side, on the in-memory broker with a real registry and repository.

Devices are played by plain links that publish what an agent would; the
end-to-end tests do the same with real agents over amqtt and Mosquitto.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet import __version__
from edgefleet.controller.catalog import register_model
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.framing import BlockFrame, FrameKind
from edgefleet.protocols.messages import (
    AgentState,
    DesiredState,
    FileRequest,
    ReportedState,
)
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.link import BrokerSettings, Will
from edgefleet.shared.memlink import MemoryBroker, MemoryLink

BS = 4096


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def topic(device_id: str, channel: Channel) -> str:
    return str(DeviceTopic(device_id, channel))


@dataclass
class Controller:
    broker: MemoryBroker
    registry: Registry
    repository: TrustRepository
    service: ControllerService
    root: Path

    def target_file(self) -> str:
        """The repository path of the one target file (as an agent would ask for it)."""
        (path,) = (p for p in (self.root / "targets").rglob("*") if p.is_file())
        return path.relative_to(self.root).as_posix()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    broker = MemoryBroker()
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    repository = TrustRepository.init(tmp_path / "repository")
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
    yield Controller(broker, registry, repository, service, tmp_path / "repository")
    service.stop()
    broker.close()
    registry.close()


class Frames:
    """A device's ``files/blocks`` handler: collects the frames of its requests."""

    def __init__(self) -> None:
        self.frames: list[BlockFrame] = []
        self.lock = threading.Lock()

    def __call__(self, _topic: str, payload: bytes, _retained: bool) -> None:
        with self.lock:
            self.frames.append(BlockFrame.decode(payload))

    def count(self) -> int:
        with self.lock:
            return len(self.frames)


def device(broker: MemoryBroker, device_id: str) -> tuple[MemoryLink, Frames]:
    link = broker.link(f"device-{device_id}")
    frames = Frames()
    link.subscribe(topic(device_id, Channel.FILE_BLOCKS), frames)
    link.start()
    return link, frames


def request(device_id: str, path: str, ranges: tuple[tuple[int, int], ...] = ()) -> bytes:
    return FileRequest(device_id, secrets.token_hex(16), path, BS, ranges).encode()


def test_answers_a_file_request_with_block_frames(controller: Controller) -> None:
    controller.registry.enroll_device("gw-1", hardware_class="generic")
    register_model(
        controller.registry,
        controller.repository,
        build_demo_model(),
        name="m",
        version="1",
        hardware_classes=("generic",),
    )
    target = controller.target_file()
    data = controller.repository.read_file(target)
    assert data is not None and len(data) > BS
    link, frames = device(controller.broker, "gw-1")
    count = -(-len(data) // BS)
    cap = ServiceSettings().max_blocks_per_request
    assert count > cap  # so the cap per request shows too
    # Like the fetcher: ask for everything missing; each answer is capped.
    for asked_from in range(0, count, cap):
        link.publish(
            topic("gw-1", Channel.FILE_REQUEST),
            request("gw-1", target, ((asked_from, count),)),
            qos=1,
        )
        expected = min(asked_from + cap, count)
        wait_for(lambda: frames.count() == expected, what=f"{expected} frames")  # noqa: B023
    assert {f.kind for f in frames.frames} == {FrameKind.DATA}
    assert {f.total_size for f in frames.frames} == {len(data)}
    blocks = sorted(frames.frames, key=lambda f: f.index)
    assert b"".join(f.payload for f in blocks) == data


def test_missing_file_is_answered_with_an_error_frame(controller: Controller) -> None:
    controller.registry.enroll_device("gw-1", hardware_class="generic")
    link, frames = device(controller.broker, "gw-1")
    link.publish(topic("gw-1", Channel.FILE_REQUEST), request("gw-1", "targets/nope.bin"), qos=1)
    wait_for(lambda: frames.count() == 1)
    assert frames.frames[0].kind is FrameKind.ERROR
    assert frames.frames[0].status == 404


def test_requests_from_strangers_and_impostors_are_refused(controller: Controller) -> None:
    controller.registry.enroll_device("gw-1", hardware_class="generic")
    stranger, stranger_frames = device(controller.broker, "gw-x")
    stranger.publish(
        topic("gw-x", Channel.FILE_REQUEST), request("gw-x", "metadata/1.root.json"), qos=1
    )
    # gw-1's topic, but the request names another device.
    impostor, impostor_frames = device(controller.broker, "gw-1")
    impostor.publish(
        topic("gw-1", Channel.FILE_REQUEST), request("gw-2", "metadata/1.root.json"), qos=1
    )
    impostor.publish(topic("gw-1", Channel.FILE_REQUEST), b"{not json", qos=1)
    wait_for(
        lambda: (
            {"unknown_device", "device_mismatch", "malformed_file_request"}
            <= set(controller.service.rejected())
        )
    )
    assert stranger_frames.count() == impostor_frames.count() == 0


def test_status_reports_and_last_will_reach_the_registry(controller: Controller) -> None:
    registry = controller.registry
    registry.enroll_device("gw-1", hardware_class="generic")
    status = topic("gw-1", Channel.STATUS)
    link = controller.broker.link("agent-gw-1", will=Will(status, b"offline", qos=1, retain=True))
    link.start()
    link.publish(status, b"online", qos=1, retain=True)
    reported = ReportedState(
        device_id="gw-1",
        state=AgentState.IDLE,
        active=None,
        previous=None,
        hardware=detect_hardware("generic"),
        generation=0,
        deployment_id=None,
        last_error=None,
        agent_version=__version__,
        updated_at=time.time(),
    )
    link.publish(topic("gw-1", Channel.REPORTED), reported.encode(), qos=1, retain=True)

    def seen() -> bool:
        info = registry.get_device("gw-1")
        assert info is not None
        return info.online and info.state == AgentState.IDLE.value

    wait_for(seen, what="gw-1 online and idle")
    link.stop(clean=False)  # a crash: the broker publishes the will
    wait_for(lambda: not seen(), what="gw-1 offline")


def test_deploy_publishes_a_retained_desired_state_and_republishes_on_reconnect(
    controller: Controller,
) -> None:
    registry, broker = controller.registry, controller.broker
    registry.enroll_device("gw-1", hardware_class="generic")
    register_model(
        registry,
        controller.repository,
        build_demo_model(),
        name="m",
        version="1",
        hardware_classes=("generic",),
    )
    deployment = controller.service.deploy("m", "1", ["gw-1"])
    desired_topic = topic("gw-1", Channel.DESIRED)
    wait_for(lambda: broker.retained(desired_topic) is not None, what="desired state")
    raw = broker.retained(desired_topic)
    assert raw is not None
    desired = DesiredState.decode(raw)
    assert desired.deployment_id == deployment.id
    assert desired.model is not None and desired.model.version == "1"
    wait_for(lambda: not registry.unpublished_desired(), what="marked published")
    # A broker restart loses retained messages; the reconnect re-sends them all.
    broker.restart()
    assert broker.retained(desired_topic) is None
    wait_for(lambda: broker.retained(desired_topic) == raw, what="desired state re-sent")
    assert controller.service.link.connected
