"""Fan-out (ADR 0010) in pieces: stream frames, stream topics, and the server's per-block rule.

The server is driven through its publish seam (frames stay "in flight" until
the test acknowledges them, as the MQTT link does until the broker's PUBACK);
the whole path runs on real brokers in tests/e2e/test_fanout.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.agent.fetcher import URL_PREFIX, MqttFetcher, PartialStore, TransferSettings
from edgefleet.controller.transfer import TransferLimits, TransferServer
from edgefleet.protocols.errors import FrameError
from edgefleet.protocols.framing import BlockFrame, FrameKind
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic, target_stream_topic
from edgefleet.shared.memlink import MemoryBroker

KiB = 1024
BS = 4 * KiB
PATH = "targets/model/1.0/" + "c0" * 32 + ".bundle"
DATA = os.urandom(64 * BS)  # 64 blocks, 256 KiB


class Files:
    def read_file(self, rel_path: str) -> bytes | None:
        return DATA if rel_path == PATH else None


class Wire:
    def __init__(self) -> None:
        self.frames: list[tuple[str, BlockFrame]] = []
        self.unacked: list[Callable[[], None]] = []

    def publish(self, topic: str, payload: bytes, on_sent: Callable[[], None]) -> None:
        self.frames.append((topic, BlockFrame.decode(payload)))
        self.unacked.append(on_sent)

    def ack_all(self) -> None:
        pending, self.unacked = self.unacked, []
        for done in pending:
            done()

    def take(self) -> list[tuple[str, BlockFrame]]:
        taken, self.frames = self.frames, []
        return taken


def server(wire: Wire, clock: list[float], **limits: object) -> TransferServer:
    return TransferServer(
        Files(),
        wire.publish,
        TransferLimits(**{"fanout_min_bytes": 1, "fanout_gather_s": 0.0, **limits}),  # type: ignore[arg-type]
        clock=lambda: clock[0],
    )


def ask(device: str, start: int, end: int, fanout: dict[str, object] | None = None) -> FileRequest:
    extra = {} if fanout is None else {"fanout": fanout}
    return FileRequest(device, "ab" * 16, PATH, BS, ((start, end),), extra=extra)


def drain(s: TransferServer, wire: Wire) -> list[tuple[str, BlockFrame]]:
    out: list[tuple[str, BlockFrame]] = []
    while s.pump():
        out += wire.take()
        wire.ack_all()
    return out + wire.take()


def stream_indices(frames: list[tuple[str, BlockFrame]]) -> list[int]:
    return [f.index for _, f in frames if f.kind is FrameKind.STREAM]


def unicast(frames: list[tuple[str, BlockFrame]], device: str) -> list[int]:
    topic = str(DeviceTopic(device, Channel.FILE_BLOCKS))
    return [f.index for t, f in frames if t == topic and f.kind is FrameKind.DATA]


def test_stream_frames_round_trip_and_are_checked_like_data() -> None:
    frame = BlockFrame.stream("0123456789abcdef", 7, 2, BS, 3 * BS, b"x" * BS)
    decoded = BlockFrame.decode(frame.encode())
    assert decoded.kind is FrameKind.STREAM
    assert (decoded.stream_id, decoded.stream_seq, decoded.index) == ("0123456789abcdef", 7, 2)
    with pytest.raises(FrameError):
        BlockFrame.stream("0123456789abcdef", 0, 2, BS, 3 * BS, b"short")
    with pytest.raises(FrameError):
        BlockFrame.stream("0123", 0, 0, BS, BS, b"x" * BS)


def test_only_content_addressed_targets_have_a_stream_topic() -> None:
    assert target_stream_topic(PATH) == "edgefleet/v1/broadcast/targets/" + "c0" * 16 + "/blocks"
    assert target_stream_topic("targets/" + "ab" * 32 + ".bin") is not None
    for path in ("metadata/timestamp.json", "targets/abc.bin", "targets/" + "AB" * 32 + ".x"):
        assert target_stream_topic(path) is None


def test_two_devices_get_each_block_once_on_the_stream() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_readahead_blocks=0)
    s.submit(ask("a", 0, 16, {}))
    s.submit(ask("b", 0, 16, {}))
    frames = drain(s, wire)
    assert stream_indices(frames) == list(range(16))
    assert unicast(frames, "a") == unicast(frames, "b") == []
    assert {t for t, _ in frames} == {target_stream_topic(PATH)}
    assert s.bytes_sent == 16 * BS and s.streams_started == 1


def test_late_joiner_repairs_sent_blocks_by_unicast_and_shares_the_rest() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_readahead_blocks=0)
    s.submit(ask("a", 0, 16, {}))
    drain(s, wire)
    s.submit(ask("late", 0, 32, {}))  # 0..15 went out before it joined
    frames = drain(s, wire)
    assert unicast(frames, "late") == list(range(16))
    assert stream_indices(frames) == list(range(16, 32))


def test_blocks_on_their_way_are_not_sent_twice_but_lost_ones_are() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_readahead_blocks=0)
    s.submit(ask("a", 0, 16, {}))
    s.submit(ask("b", 0, 16, {}))
    first = drain(s, wire)
    sid = first[0][1].stream_id
    # "a" runs ahead; "b" asks for 16..31 before it processed frames 16..31.
    s.submit(ask("a", 16, 32, {"stream": sid, "seen": 15}))
    drain(s, wire)
    s.submit(ask("b", 16, 32, {"stream": sid, "seen": 15}))
    assert unicast(drain(s, wire), "b") == []  # on their way: nothing sent twice
    # "b" processed up to frame 31 but lacks block 20 (frame 20): lost, repaired.
    s.submit(ask("b", 20, 21, {"stream": sid, "seen": 31}))
    assert unicast(drain(s, wire), "b") == [20]


def test_a_stalled_window_repairs_what_went_out_before_the_previous_request() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_readahead_blocks=0)
    s.submit(ask("a", 0, 8, {}))
    sid = drain(s, wire)[0][1].stream_id
    s.submit(ask("a", 0, 8, {"stream": sid, "seen": -1}))
    assert unicast(drain(s, wire), "a") == []  # maybe still coming
    clock[0] += 1.0  # a repeat costs a token; there are plenty
    s.submit(ask("a", 0, 8, {"stream": sid, "seen": -1, "stalled": True}))
    assert unicast(drain(s, wire), "a") == list(range(8))


def test_requests_without_fanout_and_a_server_with_fanout_off_are_unicast() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock)
    s.submit(ask("old-agent", 0, 8))
    frames = drain(s, wire)
    assert unicast(frames, "old-agent") == list(range(8)) and not stream_indices(frames)
    off = server(wire, clock, fanout=False)
    off.submit(ask("a", 0, 8, {}))
    frames = drain(off, wire)
    assert unicast(frames, "a") == list(range(8)) and not stream_indices(frames)


def test_stream_frames_stay_within_the_stream_and_total_budgets() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_inflight_bytes=8 * KiB, total_inflight_bytes=12 * KiB)
    s.submit(ask("a", 0, 64, {}))
    s.submit(ask("b", 0, 64))  # an old agent: unicast, same overall budget
    s.pump()
    assert s.inflight_bytes <= 12 * KiB + BS + 48
    sent = len(wire.frames)
    s.pump()
    assert len(wire.frames) == sent  # nothing more until acknowledged
    assert len(stream_indices(wire.frames)) <= 3  # 8 KiB stream budget, checked before each


def test_asking_again_while_blocks_wait_on_the_stream_spends_tokens() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_gather_s=100.0, busy_request_burst=2.0)
    assert s.submit(ask("a", 0, 16, {}))  # gathering: queued on the stream, not sent
    assert s.submit(ask("a", 0, 16, {}))
    assert s.submit(ask("a", 0, 16, {}))
    assert not s.submit(ask("a", 0, 16, {}))  # bucket empty: refused
    assert [f.status for _, f in wire.frames] == [429]


def test_a_fetcher_collects_stream_and_unicast_frames_into_one_file(tmp_path: Path) -> None:
    """Two fetchers over the in-memory broker; one drops stream frames and repairs them."""
    broker = MemoryBroker()
    ctl = broker.link("ctl")
    s = TransferServer(
        Files(),
        lambda t, p, done: ctl.publish(t, p, qos=1, on_sent=done),
        TransferLimits(fanout_min_bytes=1, fanout_gather_devices=2, fanout_gather_s=30.0),
    )
    ctl.subscribe(
        DeviceTopic.wildcard(Channel.FILE_REQUEST),
        lambda _t, p, _r: s.handle(FileRequest.decode(p)),
    )
    ctl.start()
    fetchers = []
    for name in ("a", "b"):
        link = broker.link(f"agent-{name}")
        f = MqttFetcher(
            link,
            name,
            PartialStore(tmp_path / name),
            TransferSettings(block_size_bytes=BS, request_timeout_s=10.0, fanout_stall_s=0.2),
        )
        link.subscribe(f.frame_topic, f.on_frame)
        link.start()
        f.expect_length(PATH, len(DATA))
        fetchers.append(f)
    fetchers[1].drop_stream_frame = lambda frame: frame.stream_seq % 5 == 0
    results: dict[str, bytes] = {}

    def run(f: MqttFetcher, name: str) -> None:
        results[name] = b"".join(f.fetch(URL_PREFIX + PATH))

    threads = [
        threading.Thread(target=run, args=(f, n)) for f, n in zip(fetchers, "ab", strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    broker.close()
    assert results == {"a": DATA, "b": DATA}
    assert fetchers[1].stream_frames_dropped > 0
    assert fetchers[0].stream_blocks_received > 0
    assert s.repair_blocks >= fetchers[1].stream_frames_dropped


def test_an_idle_stream_is_dropped_and_a_new_wave_gets_a_fresh_one() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, fanout_readahead_blocks=0, fanout_idle_s=10.0)
    s.submit(ask("a", 0, 8, {}))
    drain(s, wire)
    clock[0] += 5.0
    s.pump()
    assert len(s.stream_stats()) == 1  # still the wave's stream: repairs go unicast
    clock[0] += 6.0
    s.pump()
    assert s.stream_stats() == []
    s.submit(ask("b", 0, 8, {}))
    frames = drain(s, wire)
    assert stream_indices(frames) == list(range(8)) and s.streams_started == 2
