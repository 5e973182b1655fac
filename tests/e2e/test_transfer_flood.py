"""A device flooding file requests cannot make the controller queue without bound (issue 9.1).

Through the real path: a real broker (amqtt and Mosquitto), the real
controller service, and a hostile client publishing raw messages on its own
enrolled device's request topic, as the attack in issue 9 did, while a real
agent installs a bundle on another device.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.fetcher import TransferSettings
from edgefleet.controller.config import ServiceSettings
from edgefleet.protocols.framing import BlockFrame, FrameKind
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.e2e.harness import Harness, wait_for, wide_model

MiB = 1024 * 1024
# The default bound on transfer frame bytes the controller hands to its MQTT
# client and has not had acknowledged (``transfer_total_inflight_bytes``); a
# constant here so the same test measures the code before the bound existed.
TOTAL_INFLIGHT = 32 * MiB


def paho_queued_bytes(link: Any) -> int:
    """Payload bytes the controller's MQTT client holds unacknowledged (queued or in flight).

    paho keeps every QoS 1 message in ``_out_messages`` until the broker's
    PUBACK: the memory the flood in issue 9 grew to 7.8 GB. Reading it is the
    only way to see that queue from outside, and the same expression measures
    it on the code before the fix.
    """
    client = link._client
    with client._out_message_mutex:
        return sum(len(m.payload) for m in list(client._out_messages.values()))


def target_path(harness: Harness, version: Any) -> str:
    target = harness.repository.get_target(version.bundles[0].target_path)
    assert target is not None
    return "targets/" + str(target.get_prefixed_paths()[0])


class Flood:
    """Publishes ``rate`` file requests a second on ``device_id``'s own request topic.

    Each asks for blocks [0, 64) of ``path`` in a new request id, as the
    attacker in issue 9 did. It also listens on the device's block topic to
    see the refusals the controller answers with.
    """

    def __init__(
        self, harness: Harness, device_id: str, path: str, block_size: int, rate: float
    ) -> None:
        self.harness = harness
        self.link = MqttLink(harness.broker, f"flood-{secrets.token_hex(3)}")
        self.refusals: list[BlockFrame] = []
        self.link.subscribe(str(DeviceTopic(device_id, Channel.FILE_BLOCKS)), self._on_frame)
        self.link.start()
        self.topic = str(DeviceTopic(device_id, Channel.FILE_REQUEST))
        self.device_id = device_id
        self.path = path
        self.block_size = block_size
        self.interval = 1.0 / rate
        self.sent = 0
        self.max_queued = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_frame(self, _topic: str, payload: bytes, _retained: bool) -> None:
        frame = BlockFrame.decode(payload)
        if frame.kind is FrameKind.ERROR:
            self.refusals.append(frame)

    def _run(self) -> None:
        controller = self.harness.service.link
        while not self._stop.is_set():
            request = FileRequest(
                self.device_id, secrets.token_hex(16), self.path, self.block_size, ((0, 64),)
            )
            self.link.publish(self.topic, request.encode(), qos=1)
            self.sent += 1
            queued = paho_queued_bytes(controller)
            self.max_queued = max(self.max_queued, queued)
            if queued > 4 * TOTAL_INFLIGHT:
                return  # unbounded already: stop before the machine runs out of memory
            self._stop.wait(self.interval)

    def sample_for(self, seconds: float) -> None:
        """Keep measuring the controller's queue (the flood thread does) for ``seconds``."""
        self._stop.wait(seconds)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.link.stop()


@pytest.fixture
def flood_harness(tmp_path: Path, broker: BrokerSettings) -> Iterator[Harness]:
    h = Harness(tmp_path, broker, f"sqlite:///{tmp_path / 'registry.db'}")
    yield h
    h.close()


def test_a_request_flood_is_refused_counted_and_bounded_while_an_install_completes(
    flood_harness: Harness,
) -> None:
    h = flood_harness
    # ~5 MB: each flood request for blocks [0, 64) of 64 KiB asks for 4 MiB.
    big = h.register("1.0", wide_model(65536))
    attacker = h.enroll("gw-flood")
    h.enroll("gw-legit")
    agent = h.start_agent(
        h.agent_config("gw-legit", transfer=TransferSettings(request_timeout_s=5.0))
    )
    with Flood(h, attacker, target_path(h, big), 64 * 1024, rate=50) as flood:
        flood.sample_for(1.0)
        h.deploy("1.0", "gw-legit")
        h.wait_active(agent, "1.0", timeout_s=60)
        flood.sample_for(0.5)
    # The controller never held more than its bound of transfer frames in paho
    # (plus one frame: a budget is checked before a frame is added).
    bound = TOTAL_INFLIGHT + 65 * 1024
    assert flood.max_queued <= bound, f"controller queued {flood.max_queued} bytes"
    assert ServiceSettings().transfer_total_inflight_bytes == TOTAL_INFLIGHT
    assert h.service.transfers.peak_inflight_bytes <= bound
    assert flood.sent >= 50
    # The flood was refused, and the attacker was told when to come back.
    assert flood.refusals, "the flooding device got no refusal"
    assert all(f.status == 429 and (f.retry_after_s or 0) > 0 for f in flood.refusals)
    # Counted per device and reason, for the operator; the legitimate device never was.
    h.service.flush_rejections()
    counters = h.registry.fleet_status().counters
    assert counters.get(f"transfer_refused.{attacker}.rate", 0) >= 1
    assert counters.get("rejected.transfer_rate", 0) >= 1
    assert not any(k.startswith(f"transfer_refused.{h.device_id('gw-legit')}.") for k in counters)


def test_an_oversized_block_size_is_refused_and_counted(flood_harness: Harness) -> None:
    h = flood_harness
    v1 = h.register("1.0", wide_model(16384))
    attacker = h.enroll("gw-big-blocks")
    # The flood of issue 9: 1 MiB blocks, 50 requests a second.
    with Flood(h, attacker, target_path(h, v1), 1024 * 1024, rate=50) as flood:
        wait_for(lambda: bool(flood.refusals), what="a refusal of 1 MiB blocks")
        flood.sample_for(1.0)
    assert flood.max_queued <= 65 * 1024  # nothing but small refusals was ever queued
    assert all(f.status == 400 for f in flood.refusals)
    h.service.flush_rejections()
    counters = h.registry.fleet_status().counters
    assert counters.get(f"transfer_refused.{attacker}.block_size", 0) >= 1
    assert counters.get("rejected.transfer_block_size", 0) >= 1
