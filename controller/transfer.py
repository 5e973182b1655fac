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

Fan-out (one publication of a bundle's blocks for many devices) can sit behind
the same budgets: it is one more sender of frames whose bytes are charged to
the overall in-flight budget until acknowledged.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from edgefleet.protocols.framing import BlockFrame, block_count, block_length
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic

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


@dataclass
class _Work:
    """What is still to be sent for a device's newest request."""

    request_id: str
    topic: str
    data: bytes
    block_size: int
    indices: deque[int]


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
                busy = state.work is not None and bool(state.work.indices)
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
        indices = deque(i for i in wanted if i < count or (total == 0 and i == 0))
        with self._lock:
            state = self._devices.get(device_id)
            if state is None:  # forgotten meanwhile: only if it was idle; start afresh
                state = self._device(device_id, now)
                if state is None:
                    return False
            # The newest request replaces whatever is still queued for this device.
            state.work = _Work(request.request_id, topic, data, bs, indices) if indices else None
            state.served_path = request.path
            state.served_block_size = bs
            state.served_indices = frozenset(indices)
            if state.work is not None and not state.in_ready:
                state.in_ready = True
                self._ready.append(device_id)
        return bool(indices)

    # ------------------------------------------------------------------ frames out
    def pump(self) -> int:
        """Send frames round-robin while the budgets allow; returns how many."""
        sent = 0
        while True:
            picked = self._next_frame()
            if picked is None:
                return sent
            device_id, topic, payload, size = picked
            try:
                self._publish(topic, payload, functools.partial(self._sent, device_id, size))
            except Exception:
                self._sent(device_id, size)
                raise
            sent += 1

    def _next_frame(self) -> tuple[str, str, bytes, int] | None:
        lim = self.limits
        with self._lock:
            if self._inflight_bytes >= lim.total_inflight_bytes:
                return None
            now = self._clock()
            # First the devices in good standing; a device refused for its
            # rate lately only when none of them can send, one frame at a time.
            picked = self._pick(now, penalized=False) or self._pick(now, penalized=True)
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
