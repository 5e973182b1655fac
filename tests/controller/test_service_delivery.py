"""Event acks and the outbox marker, on the in-memory broker (tests/security: over Mosquitto)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controller.catalog import register_model
from edgefleet.controller.config import ServiceSettings
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import Registry
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.messages import Event, EventAck, EventKind
from edgefleet.protocols.topics import OUTBOX_MARKER_TOPIC, Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.memlink import MemoryBroker
from tests.controller.test_service import wait_for

CLIENT_ID = "test-controller"
J = "c0ffee00" * 2


class Inbox:
    """Everything a device link receives on one filter."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, _topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.messages.append((payload, retained))

    def live(self) -> list[bytes]:
        with self._lock:
            return [p for p, retained in self.messages if not retained]

    def all(self) -> list[bytes]:
        with self._lock:
            return [p for p, _r in self.messages]


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker()
    yield b
    b.close()


@pytest.fixture
def service(broker: MemoryBroker, tmp_path: Path) -> Iterator[ControllerService]:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    svc = ControllerService(
        registry,
        TrustRepository.init(tmp_path / "repository"),
        BrokerSettings(),
        ServiceSettings(
            client_id=CLIENT_ID,
            maintenance_interval_s=0.2,
            ingest_flush_s=0.05,
            outbox_marker_wait_s=0.5,
        ),
        links=broker.link,
    )
    svc.start()
    yield svc
    svc.stop()
    registry.close()


def test_numbered_events_are_stored_once_and_acknowledged(
    broker: MemoryBroker, service: ControllerService
) -> None:
    service.registry.enroll_device("gw-1")
    acks = Inbox()
    device = broker.link("gw-1")
    device.subscribe(str(DeviceTopic("gw-1", Channel.EVENTS_ACK)), acks)
    device.start()
    events = str(DeviceTopic("gw-1", Channel.EVENTS))
    for seq in (1, 2, 2, 1):  # with replays
        device.publish(events, Event("gw-1", EventKind.INSTALLED, journal=J, seq=seq).encode())
    wait_for(lambda: EventAck("gw-1", J, 2).encode() in acks.all(), what="the ack of 2")
    assert len(service.registry.events_for("gw-1")) == 2
    # A replay of acknowledged events is acknowledged again (the agent missed the ack).
    before = len(acks.all())
    device.publish(events, Event("gw-1", EventKind.INSTALLED, journal=J, seq=1).encode())
    wait_for(lambda: len(acks.all()) > before, what="a repeated ack")
    assert acks.all()[-1] == EventAck("gw-1", J, 2).encode()
    assert len(service.registry.events_for("gw-1")) == 2


def test_a_reconnect_republishes_only_what_the_broker_lost(
    broker: MemoryBroker, service: ControllerService
) -> None:
    registry = service.registry
    for d in ("a", "b"):
        registry.enroll_device(d)
    register_model(
        registry, service.repository, build_demo_model(), name="m", version="1",
        hardware_classes=("generic",),
    )
    service.deploy("m", "1", ["a", "b"])
    inbox = Inbox()
    watcher = broker.link("watcher")
    watcher.subscribe(str(DeviceTopic.wildcard(Channel.DESIRED)), inbox)
    watcher.start()
    wait_for(lambda: len(inbox.all()) == 2, what="2 desired states")
    # The marker follows the states it covers.
    wait_for(
        lambda: broker.retained(OUTBOX_MARKER_TOPIC) == registry.published_digest().encode(),
        what="the outbox marker",
    )
    live_before = len(inbox.live())

    assert broker.drop(CLIENT_ID)  # the controller's connection drops; the broker keeps all
    wait_for(lambda: service.link.connected, what="the controller back")
    time.sleep(1.5)  # marker wait (0.5 s) and a few maintenance rounds
    assert len(inbox.live()) == live_before, "unchanged desired states were re-published"

    broker.restart()  # a broker that lost its retained messages gets them all again
    wait_for(lambda: broker.retained(str(DeviceTopic("a", Channel.DESIRED))) is not None,
             what="a's desired state restored")
    wait_for(lambda: broker.retained(str(DeviceTopic("b", Channel.DESIRED))) is not None,
             what="b's desired state restored")
