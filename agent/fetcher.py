"""TUF's fetcher, over MQTT block transfers, resumable across restarts.

``tuf.ngclient.Updater`` does all verification; it only needs bytes for a URL
through :class:`tuf.ngclient.FetcherInterface`. :class:`MqttFetcher` supplies
them by asking the controller for blocks (``FileRequest`` on
``devices/{id}/files/request``) and collecting the binary frames it answers
with on ``devices/{id}/files/blocks``.

URLs have the form ``mqtt://repository/<path>`` where ``<path>`` is relative
to the controller's TUF repository (``metadata/timestamp.json``,
``targets/<sha256>.<name>``).

Resuming: target files are content-addressed (consistent snapshots put the
hash in the name), so blocks of a target received before a dropped link or
an agent restart stay valid. :class:`PartialStore` keeps them on disk - a
sparse data file plus an append-only log of completed block indices - and the
next request names only the blocks still missing. Metadata files are small
and mutable (``timestamp.json``), so they are always fetched whole, in memory.

Length: before a target download the installer calls
:meth:`MqttFetcher.expect_length` with the length TUF signed. A frame that
claims a larger file is refused before any byte is stored, and
``FetcherInterface.download_file`` enforces the same bound on what we yield.

Fan-out (ADR 0010): for a content-addressed target the fetcher also
subscribes to the target's stream topic
(:func:`edgefleet.protocols.topics.target_stream_topic`) before its first
request, and says so in every request (``extra["fanout"]``, with the id of
the stream it hears and the highest frame number received). Stream frames go
into the same partial file as unicast ones, so a block is a block whichever
way it came; the controller unicasts only what the stream already sent and
this device did not get (a late start, a lost frame). When no new block has
arrived for ``fanout_stall_s`` the fetcher asks again for what it lacks, which
is how lost stream frames are repaired without waiting ``request_timeout_s``.

python-tuf is not imported with this module: the agent's ``Updater`` runs in
the verifier child (:mod:`edgefleet.agent.verifier`), which this fetcher
feeds through :meth:`MqttFetcher._fetch`, so a serving agent never loads it
(BENCHMARKS.md, "Agent footprint"). For an ``Updater`` in this process,
:class:`MqttFetcher` offers the ``FetcherInterface`` surface
(``fetch``/``download_file``/``download_bytes``) through an adapter made on
first use; a 404 from the controller is our :class:`FileNotFoundOnServerError`,
and tuf's ``DownloadHTTPError(404)`` there.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import secrets
import shutil
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from edgefleet.protocols.errors import (
    FileNotFoundOnServerError,
    FrameError,
    InsufficientSpaceError,
    OversizedTransferError,
    TransferError,
    TransferTimeoutError,
)
from edgefleet.protocols.framing import (
    DEFAULT_BLOCK_SIZE,
    BlockFrame,
    FrameKind,
    block_count,
    block_length,
    coalesce,
)
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic, target_stream_topic
from edgefleet.shared.durable import atomic_write
from edgefleet.shared.link import Link

if TYPE_CHECKING:
    from tuf.ngclient import FetcherInterface

__all__ = ["URL_PREFIX", "MqttFetcher", "PartialFile", "PartialStore", "TransferSettings"]

log = logging.getLogger(__name__)

URL_PREFIX = "mqtt://repository/"
_INDEX = struct.Struct(">I")
_READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class TransferSettings:
    """How the agent pulls files. Units are in the field names."""

    block_size_bytes: int = DEFAULT_BLOCK_SIZE
    window_blocks: int = 16
    request_timeout_s: float = 10.0
    max_attempts: int = 5
    metadata_max_bytes: int = 5_000_000
    # A refusal (429/503 with a retry-after) is not a failed attempt: the
    # agent waits and asks again, up to this much waiting per file in total.
    max_refused_wait_s: float = 300.0
    # Received blocks are synced (one fdatasync) and logged, so that they
    # survive a crash, at the end of the first window that brings this many
    # unsynced bytes, and at the end of the transfer. A crash loses at most
    # about this much (fetched again on resume); smaller costs more syncs.
    sync_every_bytes: int = 4 * 1024 * 1024
    # Fan-out (ADR 0010): listen to a target's stream topic while fetching it.
    fanout: bool = True
    # With fan-out, ask again after this long without a new block (lost
    # stream frames); a failed attempt is still request_timeout_s of nothing.
    fanout_stall_s: float = 2.0


class PartialFile:
    """A target being downloaded: a sparse data file and a log of finished blocks.

    A full disk (ENOSPC, or EDQUOT) while writing removes the whole partial
    download and raises :class:`InsufficientSpaceError`: a half-written file
    that can never complete must not keep the disk full for every later
    install, across restarts.

    The log is append-only (4-byte block indices). :meth:`put_block` writes a
    block to the data file (kept open while the download runs); the block is
    named in the log only by :meth:`flush`, after one ``fdatasync`` of the
    data (:meth:`write_block` does both). The fetcher flushes at the end of a
    window once ``TransferSettings.sync_every_bytes`` are unsynced, and at the
    end of the transfer, so a block the log names survives a power cut, and a
    crash loses at most the unflushed tail, which the next run fetches again.
    A torn trailing record is ignored. The size record (``meta``) is replaced
    atomically. TUF's hash check still guards the whole file: a damaged
    partial download fails it and the installer discards it - a wasted
    download, never a wrong install.

    Progress is kept as running totals (:attr:`done_bytes`, the number of
    blocks still missing and the lowest missing index), so a block costs the
    same whether it is the first or the ten-thousandth.
    """

    def __init__(self, directory: Path, block_size: int) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.data_path = directory / "data"
        self._log_path = directory / "blocks"
        self._meta_path = directory / "meta"
        self.block_size = block_size
        self.total_size: int | None = None
        self.have: set[int] = set()
        self.done_bytes = 0  # sum of the lengths of the blocks in ``have``
        self._missing_count = 1  # unknown size: block 0 is missing
        self._first_missing = 0  # every index below it is in ``have``
        self._fd: int | None = None  # the data file, open while blocks arrive
        self._unlogged: list[int] = []  # written, not yet synced and logged
        self.unlogged_bytes = 0
        self._load()

    def _recount(self) -> None:
        """Recompute the running totals from ``have`` (load and reset only)."""
        if self.total_size is None:
            self.done_bytes, self._missing_count, self._first_missing = 0, 1, 0
            return
        count = block_count(self.total_size, self.block_size)
        self.done_bytes = sum(block_length(i, self.total_size, self.block_size) for i in self.have)
        self._missing_count = count - len(self.have)
        self._first_missing = 0
        self._advance()

    def _advance(self) -> None:
        while self._first_missing in self.have:
            self._first_missing += 1

    def _load(self) -> None:
        try:
            block_size_s, total_s = self._meta_path.read_text().split()
            if int(block_size_s) != self.block_size:
                raise ValueError("block size changed")
            self.total_size = int(total_s)
            if not self.data_path.exists():
                raise ValueError("data file missing")
            # No log yet: the size is set but no window was flushed.
            raw = self._log_path.read_bytes() if self._log_path.exists() else b""
        except (OSError, ValueError):
            self._reset()
            return
        usable = len(raw) - len(raw) % _INDEX.size
        count = block_count(self.total_size, self.block_size)
        self.have = {i for (i,) in _INDEX.iter_unpack(raw[:usable]) if i < count}
        self._recount()

    def _reset(self) -> None:
        self._close_fd()
        self._unlogged = []
        self.unlogged_bytes = 0
        for p in (self.data_path, self._log_path, self._meta_path):
            p.unlink(missing_ok=True)
        self.total_size = None
        self.have = set()
        self._recount()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def set_total(self, total_size: int) -> None:
        if self.total_size == total_size:
            return
        self._reset()
        self.total_size = total_size
        try:
            with open(self.data_path, "wb") as f:
                f.truncate(total_size)
            atomic_write(self._meta_path, f"{self.block_size} {total_size}".encode())
        except OSError as exc:
            self._give_up_if_full(exc)
            raise
        self._recount()

    def write_block(self, index: int, payload: bytes) -> None:
        """Write one block, sync it and name it in the log (durable on return)."""
        self.put_block(index, payload)
        self.flush()

    def put_block(self, index: int, payload: bytes) -> None:
        """Write one block's data; :meth:`flush` makes it durable and names it in the log."""
        if index in self.have or self.total_size is None:
            return
        length = block_length(index, self.total_size, self.block_size)
        if length == 0:
            return  # beyond the end (decoding already refuses such frames)
        try:
            if self._fd is None:
                self._fd = os.open(self.data_path, os.O_WRONLY)
            os.pwrite(self._fd, payload, index * self.block_size)
        except OSError as exc:
            self._give_up_if_full(exc)
            raise
        self._unlogged.append(index)
        self.unlogged_bytes += length
        self.have.add(index)
        self.done_bytes += length
        self._missing_count -= 1
        if index == self._first_missing:
            self._advance()

    def flush(self) -> None:
        """Sync the data written since the last flush, then name those blocks in the log.

        One ``fdatasync`` per call, not per block; the log is appended only
        after it returns, so logged still means on disk.
        """
        if not self._unlogged or self._fd is None:
            return
        try:
            os.fdatasync(self._fd)
            with open(self._log_path, "ab") as log_file:
                log_file.write(b"".join(_INDEX.pack(i) for i in self._unlogged))
        except OSError as exc:
            self._give_up_if_full(exc)
            raise
        self._unlogged = []
        self.unlogged_bytes = 0

    def close(self) -> None:
        """Flush, then close the data file (the download may go on later, from the log)."""
        try:
            self.flush()
        finally:
            self._close_fd()

    def remove(self) -> None:
        """Delete this partial download from disk entirely."""
        self._reset()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _give_up_if_full(self, exc: OSError) -> None:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return
        size, blocks = self.total_size, len(self.have)
        self.remove()
        raise InsufficientSpaceError(
            f"the disk filled up after {blocks} blocks of a {size}-byte download "
            "(another writer shares it?); the partial download was removed"
        ) from exc

    def missing(self, limit: int | None = None) -> list[int]:
        """The missing block indices in order, at most ``limit`` of them.

        Scans from the lowest missing index, so asking for the next window
        does not walk the blocks already received.
        """
        if self.total_size is None:
            return [0]
        count = block_count(self.total_size, self.block_size)
        want = self._missing_count if limit is None else min(limit, self._missing_count)
        out: list[int] = []
        i = self._first_missing
        while len(out) < want and i < count:
            if i not in self.have:
                out.append(i)
            i += 1
        return out

    @property
    def complete(self) -> bool:
        return self.total_size is not None and self._missing_count == 0

    def chunks(self) -> Iterator[bytes]:
        self.close()
        with open(self.data_path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                yield chunk


class _MemoryFile:
    """Same surface as :class:`PartialFile`, for small mutable metadata files."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.total_size: int | None = None
        self.blocks: dict[int, bytes] = {}
        self.done_bytes = 0

    @property
    def have(self) -> set[int]:
        return set(self.blocks)

    def set_total(self, total_size: int) -> None:
        if self.total_size != total_size:
            self.total_size = total_size
            self.blocks.clear()
            self.done_bytes = 0

    def write_block(self, index: int, payload: bytes) -> None:
        self.put_block(index, payload)

    def put_block(self, index: int, payload: bytes) -> None:
        if self.total_size is None or not block_length(index, self.total_size, self.block_size):
            return  # beyond the end (decoding already refuses such frames)
        if index not in self.blocks:
            self.done_bytes += len(payload)
        else:
            self.done_bytes += len(payload) - len(self.blocks[index])
        self.blocks[index] = payload

    unlogged_bytes = 0  # nothing to make durable: metadata is always fetched whole

    def flush(self) -> None:
        """Nothing to make durable: metadata is always fetched whole."""

    def close(self) -> None:
        """Nothing to close."""

    def missing(self, limit: int | None = None) -> list[int]:
        if self.total_size is None:
            return [0]
        out = [
            i for i in range(block_count(self.total_size, self.block_size)) if i not in self.blocks
        ]
        return out if limit is None else out[:limit]

    @property
    def complete(self) -> bool:
        return self.total_size is not None and len(self.blocks) == block_count(
            self.total_size, self.block_size
        )

    def chunks(self) -> Iterator[bytes]:
        for i in sorted(self.blocks):
            yield self.blocks[i]


class PartialStore:
    """Partial target downloads under ``<state>/partial/``, keyed by repository path."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _dir(self, path: str) -> Path:
        return self.directory / hashlib.sha256(path.encode()).hexdigest()[:32]

    def open(self, path: str, block_size: int) -> PartialFile:
        return PartialFile(self._dir(path), block_size)

    def blocks_present(self, path: str, block_size: int) -> int:
        """How many blocks of ``path`` are kept on disk (0 if none)."""
        d = self._dir(path)
        return len(PartialFile(d, block_size).have) if d.exists() else 0

    def bytes_present(self, path: str, block_size: int) -> int:
        """Bytes of ``path`` kept on disk, counted in whole blocks (0 if none)."""
        return self.blocks_present(path, block_size) * block_size

    def discard(self, path: str) -> None:
        shutil.rmtree(self._dir(path), ignore_errors=True)

    def discard_others(self, path: str) -> list[str]:
        """Delete every partial download except that of ``path``.

        Returns:
            The removed entries' names, sorted.
        """
        keep = self._dir(path)
        removed: list[str] = []
        if not self.directory.is_dir():
            return removed
        for entry in sorted(self.directory.iterdir()):
            if entry == keep:
                continue
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink(missing_ok=True)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(f"partial/{entry.name}")
        return removed

    def discard_all(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _RefusedError(Exception):
    """The controller answered a request with a refusal (429/503 and a retry-after)."""

    def __init__(self, retry_after_s: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.reason = reason


Progress = Callable[[str, int, int], None]
"""``progress(path, bytes_done, bytes_total)``."""


def _tuf_fetcher(fetcher: MqttFetcher) -> FetcherInterface:
    """A ``tuf.ngclient.FetcherInterface`` whose ``_fetch`` is ``fetcher``'s (tuf loads here)."""
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class _Adapter(FetcherInterface):
        def _fetch(self, url: str) -> Iterator[bytes]:
            try:
                return fetcher._fetch(url)
            except FileNotFoundOnServerError as exc:
                # tuf reads a 404 as "no such version" (e.g. the next root).
                raise DownloadHTTPError(str(exc), 404) from exc

    return _Adapter()


class MqttFetcher:
    """Fetch repository files as block transfers over a :class:`Link`.

    The agent subscribes :meth:`on_frame` to its ``files/blocks`` topic. One
    transfer runs at a time (the agent installs one bundle at a time), so
    frames are matched to it by request id; frames for an older request are
    dropped.
    """

    def __init__(
        self,
        link: Link,
        device_id: str,
        store: PartialStore,
        settings: TransferSettings = TransferSettings(),
        *,
        on_progress: Progress | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._link = link
        self._device_id = device_id
        self._store = store
        self.settings = settings
        self._on_progress = on_progress
        self._on_reject = on_reject
        self._frames: queue.Queue[BlockFrame] = queue.Queue()
        self._active_request: str | None = None
        self._expected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.requests_sent = 0
        self.blocks_received = 0
        self.blocks_by_path: Counter[str] = Counter()
        self.refusals = 0
        self._tuf: FetcherInterface | None = None
        # Fan-out: the stream topic of the running transfer, the stream heard
        # on it and the highest frame number received (paho thread writes).
        self._stream_topic: str | None = None
        self._stream_id: str | None = None
        self._stream_seen = -1
        self._subscribed: set[str] = set()
        self.stream_blocks_received = 0
        self.stream_frames_dropped = 0
        # Test hook: return True to drop a stream frame as if lost on the way.
        self.drop_stream_frame: Callable[[BlockFrame], bool] | None = None

    @property
    def request_topic(self) -> str:
        return str(DeviceTopic(self._device_id, Channel.FILE_REQUEST))

    @property
    def frame_topic(self) -> str:
        return str(DeviceTopic(self._device_id, Channel.FILE_BLOCKS))

    def expect_length(self, path: str, length: int) -> None:
        """Record the length TUF promises for ``path``; larger files are refused."""
        self._expected[path] = length

    def discard(self, path: str) -> None:
        """Forget a partial download (after success, or when its bytes proved bad)."""
        self._store.discard(path)
        self._expected.pop(path, None)

    def resumable_bytes(self, path: str) -> int:
        """Bytes of ``path`` already on disk from an earlier, interrupted download."""
        return self._store.bytes_present(path, self.settings.block_size_bytes)

    def discard_others(self, path: str) -> list[str]:
        """Delete partial downloads of every other file (to free disk for ``path``)."""
        return self._store.discard_others(path)

    def cancel(self) -> None:
        """Abort the running transfer (agent shutdown)."""
        self._cancel.set()

    # ------------------------------------------------------------------ frames in
    def on_frame(self, _topic: str, payload: bytes, _retained: bool) -> None:
        """Link handler for ``files/blocks``: decode, match, enqueue. Never raises."""
        try:
            frame = BlockFrame.decode(payload)
        except FrameError as exc:
            log.warning("dropped malformed block frame: %s", exc)
            if self._on_reject is not None:
                self._on_reject("malformed_frame")
            return
        with self._lock:
            active = self._active_request
        if frame.request_id != active:
            log.debug("dropped stale frame for request %s", frame.request_id)
            return
        self._frames.put(frame)

    def on_stream_frame(self, topic: str, payload: bytes, _retained: bool) -> None:
        """Link handler for a target's stream topic: decode, match, enqueue. Never raises."""
        try:
            frame = BlockFrame.decode(payload)
        except FrameError as exc:
            log.warning("dropped malformed stream frame: %s", exc)
            if self._on_reject is not None:
                self._on_reject("malformed_frame")
            return
        if frame.kind is not FrameKind.STREAM:
            return
        with self._lock:
            if topic != self._stream_topic:
                return  # a stream of a target we are not fetching (now)
        hook = self.drop_stream_frame
        if hook is not None and hook(frame):
            self.stream_frames_dropped += 1
            return
        self._frames.put(frame)

    def _heard(self, frame: BlockFrame) -> None:
        """Note a stream frame taken from the queue: what ``seen`` reports.

        Counted when processed, not when received: a frame still in our queue
        is neither lost nor in the partial file, and must not be asked for.
        """
        with self._lock:
            if frame.stream_id != self._stream_id:
                self._stream_id = frame.stream_id
                self._stream_seen = frame.stream_seq
            else:
                self._stream_seen = max(self._stream_seen, frame.stream_seq)

    def _fanout_extra(self, stalled: bool) -> dict[str, object]:
        """What a request tells the controller about the stream (nothing without fan-out).

        ``seen``: the highest stream frame number received (frames of one
        stream arrive in order, so a missing block at or below it was lost);
        ``stalled``: the last window ended without all its blocks, so blocks
        sent before the previous request are not coming either.
        """
        with self._lock:
            if self._stream_topic is None:
                return {}
            fanout: dict[str, object] = {"stalled": True} if stalled else {}
            if self._stream_id is not None:
                fanout.update(stream=self._stream_id, seen=self._stream_seen)
            return {"fanout": fanout}

    def _listen(self, path: str) -> str | None:
        """Subscribe to ``path``'s stream topic for this transfer (fan-out); returns it."""
        topic = target_stream_topic(path) if self.settings.fanout else None
        if topic is None:
            return None
        if topic not in self._subscribed:
            # Subscribed before the first request goes out on the same
            # connection, so the broker delivers every frame the controller
            # streams in answer to it.
            self._link.subscribe(topic, self.on_stream_frame, qos=1)
            self._subscribed.add(topic)
        with self._lock:
            self._stream_topic = topic
            self._stream_id = None
            self._stream_seen = -1
        return topic

    def _unlisten(self, topic: str | None) -> None:
        with self._lock:
            self._stream_topic = None
            self._stream_id = None
        unsubscribe = getattr(self._link, "unsubscribe", None)
        if topic is not None and callable(unsubscribe):
            # MqttLink and MemoryLink can: the broker stops sending the stream.
            try:
                unsubscribe(topic)
            except Exception:  # the frames are ignored anyway
                log.debug("unsubscribing from %s failed", topic, exc_info=True)
            else:
                self._subscribed.discard(topic)

    # ------------------------------------------------------------------ FetcherInterface
    def _interface(self) -> FetcherInterface:
        if self._tuf is None:
            self._tuf = _tuf_fetcher(self)
        return self._tuf

    def fetch(self, url: str) -> Iterator[bytes]:
        """``FetcherInterface.fetch``: our errors become tuf's ``DownloadError``."""
        return self._interface().fetch(url)

    def download_file(self, url: str, max_length: int) -> AbstractContextManager[IO[bytes]]:
        """``FetcherInterface.download_file``: at most ``max_length`` bytes into a temp file."""
        return self._interface().download_file(url, max_length)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """``FetcherInterface.download_bytes``: at most ``max_length`` bytes in memory."""
        return self._interface().download_bytes(url, max_length)

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(URL_PREFIX):
            raise TransferError(f"cannot fetch {url!r}: not an edgefleet repository URL")
        path = url[len(URL_PREFIX) :]
        bs = self.settings.block_size_bytes
        resumable = path.startswith("targets/")
        part: PartialFile | _MemoryFile = (
            self._store.open(path, bs) if resumable else _MemoryFile(bs)
        )
        limit = self._expected.get(path, self.settings.metadata_max_bytes)
        if part.total_size is not None and part.total_size > limit:
            if resumable:
                self._store.discard(path)
            part = self._store.open(path, bs) if resumable else _MemoryFile(bs)
        self._transfer(path, part, limit)
        return part.chunks()

    def _transfer(self, path: str, part: PartialFile | _MemoryFile, limit: int) -> None:
        s = self.settings
        request_id = secrets.token_hex(16)
        with self._lock:
            self._active_request = request_id
        self._drain()
        attempts = 0
        refused_wait = 0.0
        stream_topic = self._listen(path) if isinstance(part, PartialFile) else None
        stall_s = s.fanout_stall_s if stream_topic is not None else s.request_timeout_s
        idle_since = time.monotonic()
        stalled = False
        try:
            while not part.complete:
                if self._cancel.is_set():
                    raise TransferError("transfer cancelled: agent is stopping")
                # Before the size is known, ask for a whole first window; the
                # controller answers only the blocks that exist.
                if part.total_size is None:
                    wanted = list(range(s.window_blocks))
                else:
                    wanted = part.missing(s.window_blocks)
                request = FileRequest(
                    device_id=self._device_id,
                    request_id=request_id,
                    path=path,
                    block_size=s.block_size_bytes,
                    ranges=tuple(coalesce(wanted)),
                    extra=self._fanout_extra(stalled),
                )
                self._link.publish(self.request_topic, request.encode(), qos=1)
                self.requests_sent += 1
                try:
                    try:
                        progressed = self._receive(path, part, set(wanted), limit, stall_s)
                        stalled = not part.complete and not part.have.issuperset(wanted)
                    finally:
                        # One fdatasync every sync_every_bytes, then the log names
                        # the blocks; the rest at the end (part.close() below).
                        if part.unlogged_bytes >= s.sync_every_bytes:
                            part.flush()
                except _RefusedError as refusal:
                    # The controller is protecting itself: back off as told,
                    # then ask again for what is still missing.
                    self.refusals += 1
                    wait = min(refusal.retry_after_s or 1.0, s.request_timeout_s)
                    if refused_wait + wait > s.max_refused_wait_s:
                        raise TransferTimeoutError(
                            f"controller kept refusing {path} for {refused_wait:.0f}s: "
                            f"{refusal.reason}"
                        ) from None
                    refused_wait += wait
                    log.info(
                        "controller refused %s (%s); asking again in %.1fs",
                        path,
                        refusal.reason,
                        wait,
                    )
                    if self._cancel.wait(wait):
                        raise TransferError("transfer cancelled: agent is stopping") from None
                    continue
                if progressed:
                    attempts = 0
                    idle_since = time.monotonic()
                    continue
                if time.monotonic() - idle_since < s.request_timeout_s:
                    continue  # a fan-out stall: ask again, not yet a failed attempt
                idle_since = time.monotonic()
                attempts += 1
                if attempts >= s.max_attempts:
                    raise TransferTimeoutError(
                        f"no data for {path} after {attempts} requests of "
                        f"{s.request_timeout_s:g}s each; the controller may be down"
                    )
                log.info("transfer of %s stalled; retrying (%d/%d)", path, attempts, s.max_attempts)
        finally:
            with self._lock:
                self._active_request = None
            if stream_topic is not None:
                self._unlisten(stream_topic)
            part.close()

    def _receive(
        self,
        path: str,
        part: PartialFile | _MemoryFile,
        wanted: set[int],
        limit: int,
        stall_s: float,
    ) -> bool:
        """Collect frames for one window. Returns whether any new block arrived.

        The window ends when every wanted block arrived, or after ``stall_s``
        without a new block (``request_timeout_s`` without fan-out).
        """
        progressed = False
        deadline = time.monotonic() + stall_s
        while wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._cancel.is_set():
                break
            try:
                frame = self._frames.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if frame.kind is FrameKind.ERROR:
                if frame.status == 404:
                    # tuf's DownloadHTTPError(404) once it reaches tuf (_tuf_fetcher).
                    raise FileNotFoundOnServerError(f"{path}: {frame.message}")
                if frame.retry_after_s is not None:
                    # Frames still on their way stay queued for the next window.
                    raise _RefusedError(frame.retry_after_s, f"{frame.status} {frame.message}")
                raise TransferError(f"controller refused {path}: {frame.status} {frame.message}")
            if frame.total_size > limit:
                raise OversizedTransferError(
                    f"{path} is {frame.total_size} bytes but at most {limit} were promised"
                )
            if frame.block_size != part.block_size:
                continue
            if part.total_size != frame.total_size:
                # First frame of a fresh transfer, or the file changed under
                # us (mutable metadata): start over at the new size.
                part.set_total(frame.total_size)
                wanted = {i for i in wanted if block_length(i, frame.total_size, part.block_size)}
            if frame.kind is FrameKind.STREAM:
                self._heard(frame)
                if frame.index in part.have:
                    continue  # already here (a repair, or a re-sent stream)
                self.stream_blocks_received += 1
            part.put_block(frame.index, frame.payload)  # synced and logged per window
            self.blocks_received += 1
            self.blocks_by_path[path] += 1
            progressed = True
            wanted.discard(frame.index)
            deadline = time.monotonic() + stall_s
            if self._on_progress is not None and part.total_size:
                self._on_progress(path, part.done_bytes, part.total_size)
        return progressed

    def _drain(self) -> None:
        while True:
            try:
                self._frames.get_nowait()
            except queue.Empty:
                return
