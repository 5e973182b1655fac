"""Fan-out through the production broker config: TLS, client certificates and the ACL.

Every enrolled device may read ``edgefleet/v1/broadcast/#`` (ADR 0010: bundles
are not secret, topics are named by signed content), so agents with their own
certificates receive the stream; no device may publish there, so a device
cannot inject blocks into another device's download.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from edgefleet.agent.fetcher import TransferSettings
from edgefleet.protocols.framing import BlockFrame
from edgefleet.protocols.topics import target_stream_topic
from edgefleet.shared.link import MqttLink
from tests.e2e.harness import Harness, wait_for, wide_model
from tests.security.conftest import TlsBroker, ca, tls_broker  # noqa: F401 - fixtures

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def test_enrolled_devices_share_a_stream_and_cannot_write_to_it(
    tls_broker: TlsBroker,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, tls_broker.controller, f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        model = h.register("1.0", wide_model(65536))
        length = model.bundles[0].length
        target = h.repository.get_target(model.bundles[0].target_path)
        assert target is not None
        topic = target_stream_topic("targets/" + str(target.get_prefixed_paths()[0]))
        assert topic is not None
        server = h.service.transfers
        server.limits = replace(server.limits, fanout_gather_devices=2, fanout_gather_s=120.0)
        agents = []
        for name in ("gw-a", "gw-b"):
            device_id = h.enroll(name)
            config = h.agent_config(
                name,
                broker=tls_broker.device(device_id),
                transfer=TransferSettings(request_timeout_s=10.0),
            )
            agents.append(h.start_agent(config))
        # A third enrolled device listens on the stream and tries to write to it.
        evil_id = h.enroll("gw-evil")
        evil = MqttLink(tls_broker.device(evil_id), evil_id)
        heard: list[BlockFrame] = []
        lock = threading.Lock()

        def on_frame(_t: str, payload: bytes, _r: bool) -> None:
            with lock:
                heard.append(BlockFrame.decode(payload))

        evil.subscribe(topic, on_frame)
        evil.start()
        forged = BlockFrame.stream("f" * 16, 0, 0, 64 * 1024, length, b"\0" * 64 * 1024)
        try:
            evil.publish(topic, forged.encode(), qos=1)
            h.deploy("1.0", "gw-a", "gw-b")
            for agent in agents:
                h.wait_active(agent, "1.0", timeout_s=120)  # TUF: length and hash
            wait_for(lambda: len(heard) > 0, 30, "the third device to hear the stream")
        finally:
            evil.stop()
        assert all(f.stream_id != "f" * 16 for f in heard)  # its own forgery never went out
        assert server.bytes_sent <= 1.2 * length, (server.bytes_sent, length)
        for agent in agents:
            assert agent.fetcher.stream_blocks_received > 0
    finally:
        h.close()
