from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols.errors import FrameError
from edgefleet.protocols.framing import (
    HEADER,
    BlockFrame,
    FrameKind,
    block_count,
    block_length,
    coalesce,
)

RID = "0123456789abcdef" * 2


def test_data_frame_round_trip() -> None:
    frame = BlockFrame.data(RID, 2, 1024, 3000, b"z" * (3000 - 2048))
    assert BlockFrame.decode(frame.encode()) == frame


def test_error_frame_round_trip() -> None:
    frame = BlockFrame.error(RID, 404, "no such file")
    decoded = BlockFrame.decode(frame.encode())
    assert decoded.kind is FrameKind.ERROR
    assert decoded.status == 404
    assert decoded.message == "no such file"


def test_block_arithmetic() -> None:
    assert block_count(0, 1024) == 0
    assert block_count(1024, 1024) == 1
    assert block_count(1025, 1024) == 2
    assert block_length(1, 1025, 1024) == 1
    assert block_length(2, 1025, 1024) == 0
    assert coalesce([5, 1, 2, 3, 7, 6]) == [(1, 4), (5, 8)]


def test_truncated_frame() -> None:
    raw = BlockFrame.data(RID, 0, 1024, 10, b"0123456789").encode()
    with pytest.raises(FrameError, match="payload is 9 bytes"):
        BlockFrame.decode(raw[:-1])
    with pytest.raises(FrameError, match="shorter than"):
        BlockFrame.decode(raw[: HEADER.size - 1])


def test_corrupted_payload_fails_crc() -> None:
    raw = bytearray(BlockFrame.data(RID, 0, 1024, 10, b"0123456789").encode())
    raw[-1] ^= 0xFF
    with pytest.raises(FrameError, match="CRC"):
        BlockFrame.decode(bytes(raw))


def test_block_beyond_end_of_file_refused() -> None:
    with pytest.raises(FrameError, match="beyond"):
        BlockFrame.data(RID, 5, 1024, 2048, b"")


def test_wrong_length_block_refused() -> None:
    with pytest.raises(FrameError, match="expected 1024"):
        BlockFrame.data(RID, 0, 1024, 4096, b"x" * 10)


def test_bad_magic() -> None:
    raw = b"XXXX" + BlockFrame.data(RID, 0, 1024, 1, b"x").encode()[4:]
    with pytest.raises(FrameError, match="magic"):
        BlockFrame.decode(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_frame_error(raw: bytes) -> None:
    try:
        BlockFrame.decode(raw)
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 50), st.integers(1024, 4096), st.integers(0, 100_000))
def test_headers_with_any_numbers_are_checked(index: int, bs: int, total: int) -> None:
    payload = b"a" * block_length(index, total, bs)
    raw = BlockFrame(FrameKind.DATA, RID, index, bs, total, payload).encode()
    try:
        frame = BlockFrame.decode(raw)
    except FrameError:
        assert index >= max(1, block_count(total, bs))
    else:
        assert index < max(1, block_count(total, bs))
        assert len(frame.payload) == block_length(index, total, bs)


def test_a_refusal_carries_its_retry_after_through_a_round_trip() -> None:
    frame = BlockFrame.decode(BlockFrame.refusal("ab" * 16, 429, "slow down", 1.5).encode())
    assert frame.kind is FrameKind.ERROR and frame.status == 429
    assert frame.retry_after_s == 1.5 and frame.message == "slow down"
    assert BlockFrame.error("ab" * 16, 404, "no such file").retry_after_s is None
    with pytest.raises(FrameError):
        BlockFrame.refusal("ab" * 16, 404, "not a retry status", 1.0)
