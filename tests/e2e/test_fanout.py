"""Fan-out transfer (ADR 0010) through the real path.

A real broker (amqtt and Mosquitto), the real controller service and real
agents that verify what they install with TUF. Every assertion on sharing is
on bytes the controller's transfer server sent, never on time: the stream
waits until the deploy wave's devices joined (``fanout_gather_devices``), so
"starting together" does not depend on how loaded the machine is.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edgefleet.agent.daemon import Agent
from edgefleet.agent.fetcher import TransferSettings
from edgefleet.protocols.framing import BlockFrame, FrameKind
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from tests.e2e.harness import Harness, wait_for, wide_model

# A generous stall before asking again: a CPU-starved agent on a loaded machine
# must not re-ask for blocks still on their way (bytes are asserted, not time).
TRANSFER = TransferSettings(request_timeout_s=10.0, max_attempts=5, fanout_stall_s=5.0)


@pytest.fixture
def harness(tmp_path: Path, broker: BrokerSettings) -> Iterator[Harness]:
    h = Harness(tmp_path, broker, f"sqlite:///{tmp_path / 'registry.db'}")
    yield h
    h.close()


def gather(h: Harness, devices: int) -> None:
    """The stream waits for ``devices`` members (a deploy wave) before its first frame.

    And it lives as long as the test (a slow agent on a loaded machine must
    not see it end and a fresh one start, which the assertions would miss).
    """
    server = h.service.transfers
    server.limits = replace(
        server.limits, fanout_gather_devices=devices, fanout_gather_s=120.0, fanout_idle_s=600.0
    )


def start(h: Harness, name: str, transfer: TransferSettings = TRANSFER) -> Agent:
    h.enroll(name)
    return h.start_agent(h.agent_config(name, transfer=transfer))


def unicast_blocks(agent: Agent) -> int:
    f = agent.fetcher
    return sum(n for p, n in f.blocks_by_path.items() if p.startswith("targets/")) - (
        f.stream_blocks_received
    )


def test_agents_starting_together_share_one_copy_and_all_verify(harness: Harness) -> None:
    h = harness
    model = h.register("1.0", wide_model(65536))
    length = model.bundles[0].length
    assert length > 4 * 1024 * 1024
    gather(h, 3)
    agents = [start(h, f"gw-{i}") for i in range(3)]
    h.deploy("1.0", *(f"gw-{i}" for i in range(3)))
    for agent in agents:
        h.wait_active(agent, "1.0", timeout_s=120)  # installed: TUF checked length and hash
    server = h.service.transfers
    assert server.streams_started == 1
    # Controller egress: one copy of the bundle (plus small metadata), not three.
    assert server.bytes_sent <= 1.2 * length, (server.bytes_sent, length)
    assert server.stream_bytes_sent >= 0.9 * length
    for agent in agents:
        assert agent.fetcher.stream_blocks_received > 0


def test_a_late_joiner_picks_up_mid_stream_and_repairs_the_start(harness: Harness) -> None:
    h = harness
    model = h.register("1.0", wide_model(65536))
    length = model.bundles[0].length
    gather(h, 2)
    leaders = [start(h, f"gw-{i}") for i in range(2)]
    # The leaders' fetch threads stop after their first blocks until the late
    # joiner has been served (their MQTT threads go on receiving), so it
    # certainly joins a stream that is under way and has sent blocks it lacks.
    release = threading.Event()
    for agent in leaders:
        fetcher = agent.fetcher
        progress = fetcher._on_progress
        assert progress is not None

        def hold(path: str, done: int, total: int, progress=progress) -> None:  # type: ignore[no-untyped-def]
            if path.startswith("targets/") and done >= 4 * 64 * 1024:
                release.wait(120)
            progress(path, done, total)

        fetcher._on_progress = hold
    h.deploy("1.0", "gw-0", "gw-1")
    server = h.service.transfers
    wait_for(lambda: server.stream_blocks_sent >= 16, 60, "the stream to send the first window")
    late = start(h, "gw-late")
    h.deploy("1.0", "gw-late")
    try:
        wait_for(
            lambda: late.fetcher.stream_blocks_received > 0,
            120,
            "the late joiner to hear the stream",
        )
        wait_for(lambda: unicast_blocks(late) > 0, 120, "the late joiner's repairs")
    finally:
        release.set()
    for agent in [*leaders, late]:
        h.wait_active(agent, "1.0", timeout_s=120)
    assert server.repair_blocks > 0
    assert late.fetcher.stream_blocks_received > 0
    assert unicast_blocks(late) > 0
    # Shared: well under three copies (unicast would be exactly three).
    assert server.bytes_sent < 2 * length, (server.bytes_sent, length)


def test_a_lossy_subscriber_repairs_by_unicast(harness: Harness) -> None:
    h = harness
    model = h.register("1.0", wide_model(65536))
    length = model.bundles[0].length
    gather(h, 2)
    steady = start(h, "gw-steady")
    lossy = start(h, "gw-lossy")
    lossy.fetcher.drop_stream_frame = lambda frame: frame.stream_seq % 4 == 1
    h.deploy("1.0", "gw-steady", "gw-lossy")
    h.wait_active(steady, "1.0", timeout_s=120)
    h.wait_active(lossy, "1.0", timeout_s=120)
    server = h.service.transfers
    assert lossy.fetcher.stream_frames_dropped > 0
    # Every dropped frame was a block it needed: it came by unicast instead.
    assert unicast_blocks(lossy) >= lossy.fetcher.stream_frames_dropped
    assert server.repair_blocks >= lossy.fetcher.stream_frames_dropped
    assert unicast_blocks(steady) == 0 or server.bytes_sent < 2 * length
    assert server.bytes_sent < 2 * length, (server.bytes_sent, length)


def test_fanout_requests_cannot_make_a_stream_send_more_than_the_file(harness: Harness) -> None:
    """A hostile device asking for the whole file via fan-out, again and again.

    Each block goes out on the stream at most once; the rest is refused or
    unicast within its budgets, and the legitimate agent still installs.
    """
    h = harness
    model = h.register("1.0", wide_model(65536))
    length = model.bundles[0].length
    target = h.repository.get_target(model.bundles[0].target_path)
    assert target is not None
    path = "targets/" + str(target.get_prefixed_paths()[0])
    attacker = h.enroll("gw-flood")
    agent = start(h, "gw-legit")
    link = MqttLink(h.broker, f"flood-{secrets.token_hex(3)}")
    refusals: list[BlockFrame] = []
    link.subscribe(
        str(DeviceTopic(attacker, Channel.FILE_BLOCKS)),
        lambda _t, p, _r: (
            refusals.append(f) if (f := BlockFrame.decode(p)).kind is FrameKind.ERROR else None
        ),
    )
    link.start()
    topic = str(DeviceTopic(attacker, Channel.FILE_REQUEST))
    stop = threading.Event()

    def flood() -> None:
        start_block = 0
        while not stop.is_set():
            request = FileRequest(
                attacker,
                secrets.token_hex(16),
                path,
                64 * 1024,
                ((start_block, start_block + 64),),
                extra={"fanout": {"stalled": True}},
            )
            link.publish(topic, request.encode(), qos=1)
            start_block = (start_block + 64) % 128
            stop.wait(0.02)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        h.deploy("1.0", "gw-legit")
        h.wait_active(agent, "1.0", timeout_s=120)
    finally:
        stop.set()
        thread.join(10)
        link.stop()
    server = h.service.transfers
    blocks = -(-length // (64 * 1024))
    assert server.stream_blocks_sent <= blocks * server.streams_started
    assert server.peak_inflight_bytes <= server.limits.total_inflight_bytes + 65 * 1024
    wait_for(lambda: bool(refusals), 30, "the flooding device to be refused")
    assert all(f.status == 429 for f in refusals)
