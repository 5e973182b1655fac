"""Binary block frames for file transfers over MQTT.

Files (TUF metadata and bundles) travel as fixed-size blocks, each in one MQTT
message with a small binary header - never base64 inside JSON. The header
carries everything a receiver needs to place the block and to check it in
isolation, so blocks may arrive in any order, twice, or not at all::

    offset  size  field
    0       4     magic  b"EFB1"
    4       1     format version (1)
    5       1     kind: 0 = data, 1 = error, 2 = stream data
    6       2     status (error frames: 400 bad request, 404 not found,
                  429 rate limited, 503 busy)
    8       16    request id (echo of FileRequest.request_id); stream
                  frames: 8-byte stream id + 8-byte sequence number
    24      4     block index (429/503 error frames: retry-after in ms)
    28      4     block size in bytes
    32      8     total file size in bytes
    40      4     payload length
    44      4     CRC-32 of the payload
    48      ...   payload (file bytes, or a UTF-8 error message)

A data frame is consistent only if its payload is exactly as long as that
block of a file of ``total_size`` must be; anything else is a
:class:`FrameError`. Integrity of the whole file is TUF's job (hashes and
length in signed metadata); the CRC only stops a corrupted block from being
stored and then costing a full re-download.

A *refusal* is an error frame with status 429 (this device asked too often)
or 503 (the controller is busy) whose index field carries how long to wait
before asking again, in milliseconds. The agent waits that long and asks
again; it is not a failure of the transfer.

A *stream* frame (kind 2) is a data frame published once on a target's
fan-out topic (:func:`edgefleet.protocols.topics.target_stream_topic`) for
every device fetching that target (ADR 0010). Its id field names the stream
(8 bytes, new for every stream the controller starts) and numbers the frame
within it (8 bytes, from 0, no gaps): a device tells the controller the
highest number it has received, so the controller can tell a block lost on
the way (repaired by unicast) from one still on its way (not sent twice).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from edgefleet.protocols.errors import FrameError
from edgefleet.protocols.messages import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "HEADER",
    "MAGIC",
    "MAX_FILE_SIZE",
    "RETRY_STATUSES",
    "BlockFrame",
    "FrameKind",
    "block_count",
    "block_length",
    "coalesce",
]

MAGIC = b"EFB1"
FORMAT_VERSION = 1
HEADER = struct.Struct(">4sBBH16sIIQII")
DEFAULT_BLOCK_SIZE = 64 * 1024
# A sanity bound, not a policy: TUF's signed length is the real limit.
MAX_FILE_SIZE = 4 * 1024**3
MAX_ERROR_MESSAGE = 4096
# Error statuses that mean "ask again later": the index field is a retry-after.
RETRY_STATUSES = frozenset({429, 503})
_MAX_RETRY_AFTER_MS = 3_600_000


class FrameKind(IntEnum):
    DATA = 0
    ERROR = 1
    STREAM = 2


def block_count(total_size: int, block_size: int) -> int:
    """Number of blocks a file of ``total_size`` bytes splits into."""
    return (total_size + block_size - 1) // block_size


def block_length(index: int, total_size: int, block_size: int) -> int:
    """Exact payload length of block ``index``; the last block may be short."""
    start = index * block_size
    return max(0, min(block_size, total_size - start))


def coalesce(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Turn block indices into sorted half-open ``[start, end)`` ranges."""
    ranges: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    return ranges


@dataclass(frozen=True)
class BlockFrame:
    """One decoded frame: a block of a file, or an error answering a request."""

    kind: FrameKind
    request_id: str
    index: int
    block_size: int
    total_size: int
    payload: bytes
    status: int = 0

    @classmethod
    def data(
        cls, request_id: str, index: int, block_size: int, total_size: int, payload: bytes
    ) -> BlockFrame:
        frame = cls(FrameKind.DATA, request_id, index, block_size, total_size, payload)
        frame._check()
        return frame

    @classmethod
    def stream(
        cls,
        stream_id: str,
        seq: int,
        index: int,
        block_size: int,
        total_size: int,
        payload: bytes,
    ) -> BlockFrame:
        """A data frame of fan-out stream ``stream_id`` (16 hex chars), number ``seq``."""
        if len(stream_id) != 16 or not 0 <= seq < 2**64:
            raise FrameError("a stream id is 16 hex characters and seq fits 8 bytes")
        frame = cls(
            FrameKind.STREAM, f"{stream_id}{seq:016x}", index, block_size, total_size, payload
        )
        frame._check()
        return frame

    @property
    def stream_id(self) -> str:
        """For a stream frame, the stream it belongs to (16 hex chars)."""
        return self.request_id[:16]

    @property
    def stream_seq(self) -> int:
        """For a stream frame, its number within the stream (0, 1, 2, ... without gaps)."""
        return int(self.request_id[16:], 16)

    @classmethod
    def error(cls, request_id: str, status: int, message: str) -> BlockFrame:
        payload = message.encode()[:MAX_ERROR_MESSAGE]
        return cls(FrameKind.ERROR, request_id, 0, 0, 0, payload, status)

    @classmethod
    def refusal(
        cls, request_id: str, status: int, message: str, retry_after_s: float
    ) -> BlockFrame:
        """An error frame telling the agent to ask again after ``retry_after_s``.

        Raises:
            FrameError: ``status`` is not one of :data:`RETRY_STATUSES`.
        """
        if status not in RETRY_STATUSES:
            raise FrameError(f"status {status} is not a retry status")
        after_ms = min(_MAX_RETRY_AFTER_MS, max(0, round(retry_after_s * 1000)))
        payload = message.encode()[:MAX_ERROR_MESSAGE]
        return cls(FrameKind.ERROR, request_id, after_ms, 0, 0, payload, status)

    @property
    def retry_after_s(self) -> float | None:
        """For a refusal (429/503 error frame), how long to wait before asking again."""
        if self.kind is not FrameKind.ERROR or self.status not in RETRY_STATUSES:
            return None
        return min(self.index, _MAX_RETRY_AFTER_MS) / 1000

    @property
    def message(self) -> str:
        """The error text of an error frame."""
        return self.payload.decode("utf-8", errors="replace")

    def encode(self) -> bytes:
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            int(self.kind),
            self.status,
            bytes.fromhex(self.request_id),
            self.index,
            self.block_size,
            self.total_size,
            len(self.payload),
            zlib.crc32(self.payload),
        )
        return header + self.payload

    @classmethod
    def decode(cls, frame: bytes | bytearray | memoryview) -> BlockFrame:
        """Parse and check one frame.

        Raises:
            FrameError: the frame is truncated, has trailing bytes, a bad
                magic/version/CRC, or a payload inconsistent with its header.
        """
        buf = bytes(frame)
        if len(buf) < HEADER.size:
            raise FrameError(
                f"frame of {len(buf)} bytes is shorter than its {HEADER.size}-byte header"
            )
        (magic, version, kind, status, rid, index, block_size, total, length, crc) = (
            HEADER.unpack_from(buf)
        )
        if magic != MAGIC:
            raise FrameError("not an edgefleet block frame (bad magic)")
        if version != FORMAT_VERSION:
            raise FrameError(f"unsupported frame format version {version}")
        payload = buf[HEADER.size :]
        if len(payload) != length:
            raise FrameError(f"payload is {len(payload)} bytes but the header says {length}")
        if zlib.crc32(payload) != crc:
            raise FrameError("payload CRC mismatch")
        try:
            frame_kind = FrameKind(kind)
        except ValueError:
            raise FrameError(f"unknown frame kind {kind}") from None
        decoded = cls(frame_kind, rid.hex(), index, block_size, total, payload, status)
        if frame_kind is not FrameKind.ERROR:
            decoded._check()
        elif length > MAX_ERROR_MESSAGE:
            raise FrameError("error frame message too long")
        return decoded

    def _check(self) -> None:
        if not (MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE):
            raise FrameError(f"block size {self.block_size} out of range")
        if self.total_size > MAX_FILE_SIZE:
            raise FrameError(f"file size {self.total_size} exceeds {MAX_FILE_SIZE}")
        expected = block_length(self.index, self.total_size, self.block_size)
        if (self.total_size and expected == 0) or (self.total_size == 0 and self.index != 0):
            raise FrameError(f"block {self.index} lies beyond a file of {self.total_size} bytes")
        if len(self.payload) != expected:
            raise FrameError(
                f"block {self.index} carries {len(self.payload)} bytes, expected {expected}"
            )
