"""The transfer server's bounds and fairness, through its publish seam (no broker).

``publish`` here is a plain function that keeps frames "in flight" until the
test acknowledges them, which is what the MQTT link does until the broker's
PUBACK. The same server runs against real brokers in
tests/e2e/test_transfer_flood.py and tests/agent/test_fetcher.py.
"""

from __future__ import annotations

from collections.abc import Callable

from edgefleet.controller.transfer import RefusalReason, TransferLimits, TransferServer
from edgefleet.protocols.framing import BlockFrame, FrameKind
from edgefleet.protocols.messages import FileRequest

KiB = 1024
PATH = "targets/abc.bundle"


class Files:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read_file(self, rel_path: str) -> bytes | None:
        return self.files.get(rel_path)


class Wire:
    """Frames handed to the link, and their ``on_sent`` until acknowledged."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, BlockFrame]] = []
        self.unacked: list[Callable[[], None]] = []

    def publish(self, topic: str, payload: bytes, on_sent: Callable[[], None]) -> None:
        self.frames.append((topic.split("/")[3], BlockFrame.decode(payload)))
        self.unacked.append(on_sent)

    def ack_all(self) -> None:
        pending, self.unacked = self.unacked, []
        for done in pending:
            done()


def request(device: str, rid: str, bs: int = 4 * KiB, ranges=((0, 64),)) -> FileRequest:  # type: ignore[no-untyped-def]
    return FileRequest(device, rid * 16, PATH, bs, tuple(ranges))


def server(wire: Wire, clock: list[float], **limits: float) -> TransferServer:
    return TransferServer(
        Files({PATH: bytes(range(256)) * 1024}),  # 256 KiB
        wire.publish,
        TransferLimits(**limits),  # type: ignore[arg-type]
        clock=lambda: clock[0],
    )


def test_in_flight_bytes_stay_under_the_device_and_total_budgets() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, device_inflight_bytes=16 * KiB, total_inflight_bytes=24 * KiB)
    s.submit(request("a", "aa"))
    s.submit(request("b", "bb"))
    s.pump()
    # 4 KiB blocks + 48-byte headers: 3 frames fit a device's 16 KiB, the
    # fourth is added while under (a budget is checked before each frame).
    assert s.inflight_bytes <= 24 * KiB + 4 * KiB + 48
    assert s.device_inflight_bytes("a") <= 16 * KiB + 4 * KiB + 48
    sent = len(wire.frames)
    s.pump()
    assert len(wire.frames) == sent  # nothing more until acknowledged
    wire.ack_all()
    assert s.inflight_bytes == 0
    s.pump()
    assert len(wire.frames) > sent


def test_devices_are_served_round_robin() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock)
    s.submit(request("a", "aa", ranges=((0, 60),)))
    s.submit(request("b", "bb", ranges=((0, 4),)))
    s.pump()
    order = [device for device, _ in wire.frames]
    # b's four blocks go out interleaved with a's, not after a's sixty.
    assert order[:8] == ["a", "b"] * 4


def test_newest_request_replaces_queued_work_and_busy_requests_are_rate_limited() -> None:
    wire, clock = Wire(), [0.0]
    s = server(
        wire,
        clock,
        device_inflight_bytes=8 * KiB,
        busy_request_burst=2.0,
        busy_requests_per_s=1.0,
        retry_after_s=0.5,
    )
    assert s.submit(request("a", "01"))
    s.pump()
    # Busy (blocks still queued): two requests fit the bucket, the third does not.
    assert s.submit(request("a", "02"))
    assert s.submit(request("a", "03"))
    assert not s.submit(request("a", "04"))
    assert s.queued_blocks("a") <= 64  # one request's work, never the sum
    refusals = [f for _, f in wire.frames if f.kind is FrameKind.ERROR]
    assert len(refusals) == 1 and refusals[0].status == 429
    assert refusals[0].retry_after_s is not None and refusals[0].retry_after_s >= 0.5
    assert s.take_refusals() == {("a", RefusalReason.RATE): 1}
    # Tokens come back with time.
    clock[0] += 1.0
    assert s.submit(request("a", "05"))


def test_an_idle_device_asking_for_its_next_window_spends_no_token() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, busy_request_burst=0.0, busy_requests_per_s=0.001)
    for i in range(16):  # an agent: one window, all of it sent, then the next
        window = ((16 * i, 16 * i + 16),)
        assert s.submit(request("a", f"{i:02d}", bs=KiB, ranges=window))
        s.pump()
        wire.ack_all()
    assert not s.take_refusals()
    assert len(wire.frames) == 256  # the whole 256 KiB file, once


def test_asking_again_for_blocks_just_served_spends_tokens_even_when_idle() -> None:
    # The flood of issue 9 on a fast controller: every request for blocks
    # [0, 64) is sent in full before the next arrives, so the device never
    # looks busy; asking for the same bytes again and again is what costs.
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, busy_request_burst=2.0, busy_requests_per_s=1.0)

    def served(rid: str, **kw: object) -> bool:
        queued = s.submit(request("a", rid, **kw))  # type: ignore[arg-type]
        s.pump()
        wire.ack_all()
        assert s.queued_blocks("a") == 0  # idle: all of it sent and acknowledged
        return queued

    # Not repeats, so free: the first request, another block size, the next window.
    assert served("01")
    assert served("02", bs=KiB)
    assert served("03", bs=KiB, ranges=((64, 128),))
    # Repeats: one token each, then the bucket is empty.
    assert served("04", bs=KiB, ranges=((100, 101),))
    assert served("05", bs=KiB, ranges=((100, 101),))
    assert not s.submit(request("a", "06", bs=KiB, ranges=((100, 101),)))
    assert s.take_refusals() == {("a", RefusalReason.RATE): 1}


def test_a_retry_after_a_timeout_is_served() -> None:
    # An agent that lost frames asks again for what is missing, seconds later:
    # one token, long since refilled.
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, busy_request_burst=1.0, busy_requests_per_s=0.5)
    assert s.submit(request("a", "01", ranges=((0, 16),)))
    s.pump()
    wire.ack_all()
    clock[0] += 10.0
    assert s.submit(request("a", "02", ranges=((3, 4), (9, 10))))
    assert not s.take_refusals()


def test_oversized_blocks_are_refused_and_requests_are_capped() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, max_block_size_bytes=64 * KiB, max_request_bytes=32 * KiB)
    assert not s.submit(request("a", "aa", bs=1024 * KiB))
    ((_, refusal),) = wire.frames
    assert refusal.kind is FrameKind.ERROR and refusal.status == 400
    assert s.take_refusals() == {("a", RefusalReason.BLOCK_SIZE): 1}
    s.submit(request("a", "bb", bs=4 * KiB))
    s.pump()
    assert len([f for _, f in wire.frames if f.kind is FrameKind.DATA]) == 8  # 32 KiB / 4 KiB


def test_refusal_frames_to_one_device_are_themselves_rate_limited() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, max_block_size_bytes=64 * KiB, refusal_interval_s=1.0)
    for _ in range(100):
        s.submit(request("a", "aa", bs=1024 * KiB))
    assert len(wire.frames) == 1
    assert s.take_refusals()[("a", RefusalReason.BLOCK_SIZE)] == 100


def test_a_device_refused_for_its_rate_is_served_last_and_one_frame_at_a_time() -> None:
    wire, clock = Wire(), [0.0]
    s = server(wire, clock, busy_request_burst=0.0, busy_requests_per_s=0.01, penalty_s=5.0)
    s.submit(request("a", "01"))
    assert not s.submit(request("a", "02"))  # busy, no token: refused and penalized
    s.submit(request("b", "bb", ranges=((0, 8),)))
    s.pump()
    data = [device for device, f in wire.frames if f.kind is FrameKind.DATA]
    # b's eight blocks first; a then gets a single frame in flight, not its 2 MiB.
    assert data[:8] == ["b"] * 8
    assert data[8:] == ["a"]
    wire.ack_all()
    s.pump()
    assert len([d for d, f in wire.frames if f.kind is FrameKind.DATA]) == 9  # paced: 10/s
    clock[0] += 0.1
    s.pump()
    assert [d for d, f in wire.frames if f.kind is FrameKind.DATA][9:] == ["a"]
    # The penalty ends: a's full budget again.
    clock[0] += 6.0
    wire.ack_all()
    s.pump()
    assert len([d for d, f in wire.frames if f.kind is FrameKind.DATA]) > 12
