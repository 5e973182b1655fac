"""Answer agents' ``FileRequest``s with binary block frames, within bounds.

The controller serves exactly the files of its TUF repository, by path
relative to the repository root, and nothing else: :class:`FileSource` is the
narrow read interface (``TrustRepository.read_file`` implements it). Target
files are immutable (content-addressed), so their bytes are cached; metadata
files such as ``timestamp.json`` change and are read afresh.

Every device is potentially hostile, so nothing one device asks for may make
the controller queue without limit (issue 9: one device publishing 50
requests/s once queued gigabytes of QoS 1 frames in paho). The bounds:

- **Per request:** ``block_size`` at most ``max_block_size_bytes`` (larger is
  refused, 400) and at most ``max_blocks_per_request`` blocks and
  ``max_request_bytes`` bytes served (the rest is simply not sent; the agent
  asks again for what is still missing).
- **Queued work:** each device has at most one request queued - its newest.
  The agent only listens to its newest request, so an older one's remaining
  blocks would be wasted anyway. The work is block indices, not bytes.
- **In flight:** a frame counts from the moment it is handed to the MQTT
  client until the broker acknowledges it (paho's ``on_publish``); at most
  ``device_inflight_bytes`` per device and ``total_inflight_bytes`` overall.
  This is the memory paho can hold for transfers.
- **Rate:** a request that arrives while the device still has blocks queued,
  or that asks again for blocks its previous request was already served,
  takes a token from that device's bucket (``busy_requests_per_s``, burst
  ``busy_request_burst``). A well-behaved agent asks for its next window only
  after the last one arrived, and for blocks it has not got, so it never
  spends tokens (a retry after a timeout spends one); a flood does, and once
  the bucket is empty its requests are refused with a retry-after. The
  repeat rule matters on a fast controller: there the whole of a flood
  request can be sent before the next one arrives, so the device is never
  seen busy, yet it keeps asking for the same bytes.
- **Fairness:** frames go out round-robin, one per device with queued work
  and room in its budget per turn, so one device's queue never starves the
  others. A device refused for its rate in the last ``penalty_s`` is served
  only when no other device can send, one frame at a time and at most
  ``penalized_frames_per_s``: on a controller short of CPU, even idle
  bandwidth spent on a flood slows everyone else, so a flooding device gets
  a trickle, and the devices in good standing almost everything.

Refusals are error frames (429 rate limited, 503 busy) carrying a
retry-after (see :mod:`edgefleet.protocols.framing`); the agent waits that
long and asks again instead of timing out. They are counted per device and
reason (:attr:`TransferServer.refusals`), and at most one refusal frame per
device is sent per ``refusal_interval_s``, so refusing costs little too.

Fan-out (ADR 0010): a request for a content-addressed target from an agent
that says it listens to the target's stream topic (``extra["fanout"]``) is
served through a *stream*, one per target and block size: a wanted block not
yet sent in this stream is queued on the stream and published once, on
``broadcast/targets/<hash>/blocks``, for every device fetching the target
(plus ``fanout_readahead_blocks`` after it, which every subscriber needs
too); a wanted block the stream already sent is unicast to that device as
before - a late joiner repairing the start, or a device that lost frames -
unless it is still on its way: the agent reports the highest stream frame
number it received, and a block sent after the device's previous request
and above that number is not sent again. A new stream waits ``fanout_gather_s``
(or until ``fanout_gather_devices`` devices joined) before its first frame,
so devices of one deploy wave start together. The stream is one more sender
in the round-robin: its frames are charged to its own ``fanout_inflight_bytes``
and to the overall ``total_inflight_bytes`` until acknowledged, each block is
sent at most once per stream, and the per-device rules above (one queued
request, tokens for busy or repeated requests, refusals) apply to fan-out
requests exactly as to unicast ones. Streams are bounded in number
(``max_streams``) and dropped after ``fanout_idle_s`` without requests.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from edgefleet.protocols.framing import BlockFrame, block_count, block_length
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic, target_stream_topic

__all__ = [
    "FileSource",
    "Publish",
    "RefusalReason",
    "TransferLimits",
    "TransferServer",
]

log = logging.getLogger(__name__)


class FileSource(Protocol):
    def read_file(self, rel_path: str) -> bytes | None:
        """The bytes of a repository file, or None if there is no such file."""


Publish = Callable[[str, bytes, Callable[[], None]], object]
"""``publish(topic, payload, on_sent)``: send one frame (QoS 1, not retained).

``on_sent`` must be called exactly once, when the broker has acknowledged the
frame (or it was dropped for good): that is when its bytes leave the in-flight
budget. It may be called from another thread, and even before ``publish``
returns.
"""


class RefusalReason(str, Enum):
    """Why a request was refused: a fixed set, so per-device counters stay bounded."""

    BLOCK_SIZE = "block_size"
    """``block_size`` above ``max_block_size_bytes`` (400, not retried)."""
    RATE = "rate"
    """Requests while busy beyond the device's token bucket (429, retry-after)."""
    QUEUE_FULL = "queue_full"
    """The controller's request queue or device table is full (503, retry-after)."""


@dataclass(frozen=True)
class TransferLimits:
    """The transfer server's bounds. Units are in the field names."""

    max_block_size_bytes: int = 256 * 1024
    max_blocks_per_request: int = 64
    max_request_bytes: int = 4 * 1024 * 1024
    device_inflight_bytes: int = 2 * 1024 * 1024
    total_inflight_bytes: int = 32 * 1024 * 1024
    busy_requests_per_s: float = 2.0
    busy_request_burst: float = 5.0
    retry_after_s: float = 1.0
    refusal_interval_s: float = 0.25
    penalty_s: float = 10.0
    penalized_frames_per_s: float = 10.0
    max_devices: int = 100_000
    # Fan-out (ADR 0010). Off: every request is served by unicast, as before.
    fanout: bool = True
    fanout_min_bytes: int = 1024 * 1024
    fanout_inflight_bytes: int = 4 * 1024 * 1024
    fanout_gather_s: float = 0.3
    fanout_gather_devices: int = 0  # start before gather_s once this many joined (0: never)
    fanout_readahead_blocks: int = 32
    fanout_idle_s: float = 10.0
    max_streams: int = 64


@dataclass
class _Work:
    """What is still to be sent for a device's newest request."""

    request_id: str
    topic: str
    data: bytes
    block_size: int
    indices: deque[int]


@dataclass
class _Stream:
    """One fan-out stream: a target's blocks published once for every device fetching it."""

    path: str
    stream_id: str
    topic: str
    data: bytes
    block_size: int
    count: int
    created_at: float
    last_request_at: float
    sent: dict[int, int] = field(default_factory=dict)  # block index -> frame number
    queue: deque[int] = field(default_factory=deque)
    queued: set[int] = field(default_factory=set)
    next_seq: int = 0
    # Per member device: ``next_seq`` when it joined and when its previous
    # request was handled.
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    inflight_bytes: int = 0
    blocks_sent: int = 0

    def gathered(self, now: float, limits: TransferLimits) -> bool:
        if now >= self.created_at + limits.fanout_gather_s:
            return True
        return 0 < limits.fanout_gather_devices <= len(self.members)

    def enqueue(self, index: int) -> bool:
        if index in self.sent or index in self.queued or not 0 <= index < self.count:
            return False
        self.queue.append(index)
        self.queued.add(index)
        return True


@dataclass
class _Device:
    """Per-device state: queued work, bytes in flight, token bucket."""

    tokens: float
    refilled_at: float
    inflight_bytes: int = 0
    work: _Work | None = None
    refused_at: float = float("-inf")
    penalized_until: float = float("-inf")
    next_frame_at: float = float("-inf")
    in_ready: bool = False
    # What the device's last queued request asked for: a new request for any of
    # the same blocks of the same file is a repeat (see the module docstring).
    # At most ``max_blocks_per_request`` indices, so the memory is bounded.
    served_path: str = ""
    served_block_size: int = 0
    served_indices: frozenset[int] = frozenset()
    # Blocks of its last request left to a stream (busy while still queued there).
    streamed_key: tuple[str, int] | None = None
    streamed: frozenset[int] = frozenset()

    def repeats(self, path: str, block_size: int, indices: list[int]) -> bool:
        return (
            path == self.served_path
            and block_size == self.served_block_size
            and not self.served_indices.isdisjoint(indices)
        )


class TransferServer:
    """Queues :class:`FileRequest` work per device and sends frames within budgets.

    Threads: :meth:`submit` and :meth:`pump` run on the transfer worker;
    ``on_sent`` callbacks arrive on the MQTT client's thread. :meth:`pump`
    never holds the lock while publishing (paho calls ``on_publish`` with its
    own lock held, so holding ours across ``publish`` could deadlock).
    """

    def __init__(
        self,
        source: FileSource,
        publish: Publish,
        limits: TransferLimits = TransferLimits(),
        *,
        cache_bytes: int = 256 * 1024 * 1024,
        on_capacity: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._publish = publish
        self.limits = limits
        self._on_capacity = on_capacity
        self._clock = clock
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._cache_lock = threading.Lock()
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._ready: deque[str] = deque()  # devices with queued work, round-robin order
        self._inflight_bytes = 0
        self.peak_inflight_bytes = 0
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.refusals: Counter[tuple[str, RefusalReason]] = Counter()
        # Fan-out: streams by (path, block size), in round-robin order.
        self._streams: OrderedDict[tuple[str, int], _Stream] = OrderedDict()
        self._stream_turn = False
        self.streams_started = 0
        self.stream_blocks_sent = 0
        self.stream_bytes_sent = 0
        # Blocks of fan-out requests queued for unicast (late joiners, lost frames).
        self.repair_blocks = 0

    # ------------------------------------------------------------------ reading
    def _read(self, path: str) -> bytes | None:
        if not path.startswith("targets/"):
            return self._source.read_file(path)
        with self._cache_lock:
            data = self._cache.get(path)
            if data is not None:
                self._cache.move_to_end(path)
                return data
        data = self._source.read_file(path)
        if data is not None and len(data) <= self._cache_bytes:
            with self._cache_lock:
                self._cache[path] = data
                self._cached += len(data)
                while self._cached > self._cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data

    # ------------------------------------------------------------------ state
    @property
    def inflight_bytes(self) -> int:
        """Bytes handed to the MQTT client and not yet acknowledged by the broker."""
        with self._lock:
            return self._inflight_bytes

    def device_inflight_bytes(self, device_id: str) -> int:
        with self._lock:
            state = self._devices.get(device_id)
            return state.inflight_bytes if state else 0

    def queued_blocks(self, device_id: str | None = None) -> int:
        """Blocks queued but not yet handed to the MQTT client (one device, or all)."""
        with self._lock:
            if device_id is None:
                states = list(self._devices.values())
            else:
                state = self._devices.get(device_id)
                states = [state] if state is not None else []
            return sum(len(s.work.indices) for s in states if s.work is not None)

    def count_refusal(self, device_id: str | None, reason: RefusalReason) -> None:
        """Count a refusal made elsewhere (the service's request queue was full).

        ``None`` for a device that is not known to be enrolled: counted for the
        fleet only, so unverified ids never become counter names.
        """
        with self._lock:
            self.refusals[(device_id or "", reason)] += 1

    def take_refusals(self) -> Counter[tuple[str, RefusalReason]]:
        """Refusals counted since the last call, by (device, reason); resets the count."""
        with self._lock:
            taken, self.refusals = self.refusals, Counter()
        return taken

    def _device(self, device_id: str, now: float) -> _Device | None:
        state = self._devices.get(device_id)
        if state is None:
            if len(self._devices) >= self.limits.max_devices:
                self._forget_idle(now)
                if len(self._devices) >= self.limits.max_devices:
                    return None
            state = _Device(tokens=self.limits.busy_request_burst, refilled_at=now)
            self._devices[device_id] = state
        return state

    def _forget_idle(self, now: float) -> None:
        """Drop devices with nothing queued or in flight and a full bucket."""
        burst = self.limits.busy_request_burst
        idle = [
            d
            for d, s in self._devices.items()
            if s.work is None and s.inflight_bytes == 0 and self._tokens(s, now) >= burst
        ]
        for device_id in idle:
            del self._devices[device_id]

    def _tokens(self, state: _Device, now: float) -> float:
        lim = self.limits
        state.tokens = min(
            lim.busy_request_burst,
            state.tokens + (now - state.refilled_at) * lim.busy_requests_per_s,
        )
        state.refilled_at = now
        return state.tokens

    # ------------------------------------------------------------------ requests in
    def refuse(
        self,
        device_id: str,
        request_id: str,
        reason: RefusalReason,
        message: str,
        retry_after_s: float | None = None,
    ) -> None:
        """Count a refusal and tell the device (at most once per ``refusal_interval_s``)."""
        now = self._clock()
        with self._lock:
            self.refusals[(device_id, reason)] += 1
            state = self._device(device_id, now)
            if state is not None:
                if now - state.refused_at < self.limits.refusal_interval_s:
                    return
                state.refused_at = now
        topic = str(DeviceTopic(device_id, Channel.FILE_BLOCKS))
        if reason is RefusalReason.BLOCK_SIZE:
            frame = BlockFrame.error(request_id, 400, message)
        else:
            status = 429 if reason is RefusalReason.RATE else 503
            after = self.limits.retry_after_s if retry_after_s is None else retry_after_s
            frame = BlockFrame.refusal(request_id, status, message, after)
        log.info("refused file request from %s (%s): %s", device_id, reason.value, message)
        self._publish(topic, frame.encode(), _nothing)

    def submit(self, request: FileRequest) -> bool:
        """Queue a request's blocks, or refuse it. Returns whether it was queued.

        Call :meth:`pump` afterwards to send what the budgets allow.
        """
        lim = self.limits
        device_id = request.device_id
        if request.block_size > lim.max_block_size_bytes:
            self.refuse(
                device_id,
                request.request_id,
                RefusalReason.BLOCK_SIZE,
                f"block_size {request.block_size} exceeds {lim.max_block_size_bytes}",
            )
            return False
        bs = request.block_size
        limit = max(1, min(lim.max_blocks_per_request, lim.max_request_bytes // bs))
        wanted = request.block_indices(limit) if request.ranges else [0]
        now = self._clock()
        with self._lock:
            state = self._device(device_id, now)
            if state is None:
                full = True
                retry_after = lim.retry_after_s
            else:
                full = False
                tokens = self._tokens(state, now)
                busy = (state.work is not None and bool(state.work.indices)) or self._streaming(
                    state
                )
                costly = busy or state.repeats(request.path, bs, wanted)
                if costly and tokens < 1.0:
                    retry_after = max(lim.retry_after_s, (1.0 - tokens) / lim.busy_requests_per_s)
                    state.penalized_until = now + lim.penalty_s
                else:
                    retry_after = 0.0
                    if costly:
                        state.tokens -= 1.0
        if full:
            self.refuse(
                device_id,
                request.request_id,
                RefusalReason.QUEUE_FULL,
                "transfer server is tracking too many devices",
                retry_after,
            )
            return False
        if retry_after:
            self.refuse(
                device_id,
                request.request_id,
                RefusalReason.RATE,
                "too many file requests while earlier ones are being served",
                retry_after,
            )
            return False

        topic = str(DeviceTopic(device_id, Channel.FILE_BLOCKS))
        data = self._read(request.path)
        if data is None:
            log.info("%s asked for missing file %s", device_id, request.path)
            self._publish(
                topic, BlockFrame.error(request.request_id, 404, "no such file").encode(), _nothing
            )
            return False
        total = len(data)
        count = block_count(total, bs)
        valid = [i for i in wanted if i < count or (total == 0 and i == 0)]
        indices = deque(valid)
        streamed: list[int] = []
        with self._lock:
            state = self._devices.get(device_id)
            if state is None:  # forgotten meanwhile: only if it was idle; start afresh
                state = self._device(device_id, now)
                if state is None:
                    return False
            stream = self._stream_for(request, data, now)
            if stream is not None:
                indices, streamed = self._split(stream, device_id, request, valid)
            state.streamed_key = (request.path, bs) if streamed else None
            state.streamed = frozenset(streamed)
            # The newest request replaces whatever is still queued for this device.
            state.work = _Work(request.request_id, topic, data, bs, indices) if indices else None
            state.served_path = request.path
            state.served_block_size = bs
            # Every block asked for, streamed or not: asking again is a repeat.
            state.served_indices = frozenset(valid)
            if state.work is not None and not state.in_ready:
                state.in_ready = True
                self._ready.append(device_id)
        return bool(indices) or bool(streamed)

    # ------------------------------------------------------------------ fan-out
    def _streaming(self, state: _Device) -> bool:
        """Whether blocks of the device's last request still wait on a stream (lock held)."""
        if state.streamed_key is None:
            return False
        stream = self._streams.get(state.streamed_key)
        return stream is not None and not stream.queued.isdisjoint(state.streamed)

    def _stream_for(self, request: FileRequest, data: bytes, now: float) -> _Stream | None:
        """The stream serving this request, started if need be; None: unicast (lock held)."""
        lim = self.limits
        wants = request.extra.get("fanout")
        if not lim.fanout or not isinstance(wants, dict) or len(data) < lim.fanout_min_bytes:
            return None
        key = (request.path, request.block_size)
        # Idle streams go here (at most max_streams to look at), so a stream's
        # bytes are not held long after its wave finished.
        self._expire_streams(now)
        stream = self._streams.get(key)
        if stream is None:
            topic = target_stream_topic(request.path)
            if topic is None:
                return None
            if len(self._streams) >= lim.max_streams:
                return None
            stream = _Stream(
                path=request.path,
                stream_id=secrets.token_hex(8),
                topic=topic,
                data=data,
                block_size=request.block_size,
                count=block_count(len(data), request.block_size),
                created_at=now,
                last_request_at=now,
            )
            self._streams[key] = stream
            self.streams_started += 1
            log.info("started fan-out stream %s for %s", stream.stream_id, request.path)
        stream.last_request_at = now
        return stream

    def _split(
        self, stream: _Stream, device_id: str, request: FileRequest, wanted: list[int]
    ) -> tuple[deque[int], list[int]]:
        """Which wanted blocks go by unicast (repairs) and which are left to the stream.

        A block the stream has not sent is queued on it. One it sent is a
        repair (unicast) if it went out before the device joined, or at or
        below the highest frame number the device says it received (frames
        of one stream arrive in order, so it was lost), or - when the device
        says its last window stalled - before the device's previous request;
        otherwise it is still on its way and is not sent twice.
        """
        wants = request.extra.get("fanout")
        seen = -1
        stalled = False
        if isinstance(wants, dict):
            stalled = wants.get("stalled") is True
            got = wants.get("seen")
            if wants.get("stream") == stream.stream_id and type(got) is int:
                seen = got
        joined, previous = stream.members.get(device_id, (stream.next_seq, stream.next_seq))
        unicast: deque[int] = deque()
        streamed: list[int] = []
        for index in wanted:
            seq = stream.sent.get(index)
            if seq is None:
                stream.enqueue(index)
                streamed.append(index)
            elif seq < joined or seq <= seen or (stalled and seq < previous):
                unicast.append(index)
            else:
                streamed.append(index)  # on its way
        if streamed and wanted:
            last = max(wanted)
            for index in range(
                last + 1, min(stream.count, last + 1 + self.limits.fanout_readahead_blocks)
            ):
                stream.enqueue(index)
        self.repair_blocks += len(unicast)
        if len(stream.members) < self.limits.max_devices or device_id in stream.members:
            stream.members[device_id] = (joined, stream.next_seq)
        return unicast, streamed

    def _expire_streams(self, now: float) -> None:
        """Drop streams with nothing queued or in flight and no request lately (lock held)."""
        idle = [
            key
            for key, st in self._streams.items()
            if not st.queue
            and st.inflight_bytes == 0
            and now - st.last_request_at >= self.limits.fanout_idle_s
        ]
        for key in idle:
            del self._streams[key]

    def _stream_frame(self, now: float) -> tuple[_Stream, str, bytes, int] | None:
        """The next stream frame that may go out now, round-robin across streams (lock held)."""
        lim = self.limits
        for _ in range(len(self._streams)):
            key, stream = next(iter(self._streams.items()))
            self._streams.move_to_end(key)
            if (
                not stream.queue
                or stream.inflight_bytes >= lim.fanout_inflight_bytes
                or not stream.gathered(now, lim)
            ):
                continue
            index = stream.queue.popleft()
            stream.queued.discard(index)
            seq = stream.next_seq
            stream.next_seq += 1
            stream.sent[index] = seq
            total = len(stream.data)
            start = index * stream.block_size
            payload = stream.data[start : start + block_length(index, total, stream.block_size)]
            encoded = BlockFrame.stream(
                stream.stream_id, seq, index, stream.block_size, total, payload
            ).encode()
            size = len(encoded)
            stream.inflight_bytes += size
            stream.blocks_sent += 1
            self.stream_blocks_sent += 1
            self.stream_bytes_sent += len(payload)
            self.blocks_sent += 1
            self.bytes_sent += len(payload)
            return stream, stream.topic, encoded, size
        return None

    def _stream_sent(self, stream: _Stream, size: int) -> None:
        with self._lock:
            self._inflight_bytes -= size
            stream.inflight_bytes -= size
        if self._on_capacity is not None:
            self._on_capacity()

    def stream_stats(self) -> list[dict[str, object]]:
        """Per live stream: path, id, members, blocks sent and queued (status, tests)."""
        with self._lock:
            return [
                {
                    "path": st.path,
                    "stream_id": st.stream_id,
                    "members": len(st.members),
                    "blocks": st.count,
                    "sent": st.blocks_sent,
                    "queued": len(st.queue),
                }
                for st in self._streams.values()
            ]

    # ------------------------------------------------------------------ frames out
    def pump(self) -> int:
        """Send frames round-robin while the budgets allow; returns how many."""
        sent = 0
        if self._streams:  # a finished wave's stream lets go of its bytes
            with self._lock:
                self._expire_streams(self._clock())
        while True:
            picked = self._next_frame()
            if picked is None:
                return sent
            owner, topic, payload, size = picked
            done = (
                functools.partial(self._sent, owner, size)
                if isinstance(owner, str)
                else functools.partial(self._stream_sent, owner, size)
            )
            try:
                self._publish(topic, payload, done)
            except Exception:
                done()
                raise
            sent += 1

    def _next_frame(self) -> tuple[str | _Stream, str, bytes, int] | None:
        lim = self.limits
        with self._lock:
            if self._inflight_bytes >= lim.total_inflight_bytes:
                return None
            now = self._clock()
            # Streams take turns with the devices in good standing (a stream
            # serves many devices, and its frames are charged to the same
            # overall budget); a device refused for its rate lately sends
            # only when none of them can, one frame at a time.
            self._stream_turn = not self._stream_turn
            streamed = self._stream_frame(now) if self._stream_turn and self._streams else None
            if streamed is not None:
                return self._charge_stream(streamed)
            picked = self._pick(now, penalized=False)
            if picked is None and self._streams:
                streamed = self._stream_frame(now)
                if streamed is not None:
                    return self._charge_stream(streamed)
            if picked is None:
                picked = self._pick(now, penalized=True)
            if picked is None:
                return None
            device_id, state, work = picked
            index = work.indices.popleft()
            if work.indices:
                self._ready.append(device_id)
            else:
                state.work = None
                state.in_ready = False
            total = len(work.data)
            start = index * work.block_size
            payload = work.data[start : start + block_length(index, total, work.block_size)]
            frame = BlockFrame.data(work.request_id, index, work.block_size, total, payload)
            encoded = frame.encode()
            size = len(encoded)
            state.inflight_bytes += size
            self._inflight_bytes += size
            self.peak_inflight_bytes = max(self.peak_inflight_bytes, self._inflight_bytes)
            self.blocks_sent += 1
            self.bytes_sent += len(payload)
            return device_id, work.topic, encoded, size

    def _charge_stream(
        self, streamed: tuple[_Stream, str, bytes, int]
    ) -> tuple[str | _Stream, str, bytes, int]:
        """Count a stream frame against the overall budget (lock held)."""
        size = streamed[3]
        self._inflight_bytes += size
        self.peak_inflight_bytes = max(self.peak_inflight_bytes, self._inflight_bytes)
        return streamed

    def _pick(self, now: float, penalized: bool) -> tuple[str, _Device, _Work] | None:
        """The next device in round-robin order that may send a frame now (lock held).

        The picked device is taken off the front of ``_ready``; the caller
        puts it back at the end if it has more work.
        """
        lim = self.limits
        for _ in range(len(self._ready)):
            device_id = self._ready.popleft()
            state = self._devices.get(device_id)
            work = state.work if state is not None else None
            if state is None or work is None or not work.indices:
                if state is not None:
                    state.in_ready = False
                continue  # superseded by an empty request, or forgotten: no longer ready
            is_penalized = state.penalized_until > now
            if is_penalized != penalized or (
                state.inflight_bytes >= lim.device_inflight_bytes
                if not is_penalized
                else state.inflight_bytes > 0 or now < state.next_frame_at
            ):
                self._ready.append(device_id)
                continue
            if is_penalized:
                state.next_frame_at = now + 1.0 / lim.penalized_frames_per_s
            return device_id, state, work
        return None

    def _sent(self, device_id: str, size: int) -> None:
        with self._lock:
            self._inflight_bytes -= size
            state = self._devices.get(device_id)
            if state is not None:
                state.inflight_bytes -= size
        if self._on_capacity is not None:
            self._on_capacity()

    def handle(self, request: FileRequest) -> int:
        """Queue one request and send what the budgets allow now (tests, simple callers)."""
        self.submit(request)
        return self.pump()


def _nothing() -> None:
    """``on_sent`` for frames outside the budgets (small error and refusal frames)."""
