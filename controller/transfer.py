"""Answer agents' ``FileRequest``s with binary block frames.

The controller serves exactly the files of its TUF repository, by path
relative to the repository root, and nothing else: :class:`FileSource` is the
narrow read interface (``TrustRepository.read_file`` implements it). Target
files are immutable (content-addressed), so their bytes are cached; metadata
files such as ``timestamp.json`` change and are read afresh.

A single request is capped at ``max_blocks_per_request`` blocks, so one agent
cannot make the controller queue a whole multi-gigabyte file in one go; the
agent simply asks again for what is still missing.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from edgefleet.protocols.framing import BlockFrame, block_count, block_length
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic

__all__ = ["FileSource", "Publish", "TransferServer"]

log = logging.getLogger(__name__)


class FileSource(Protocol):
    def read_file(self, rel_path: str) -> bytes | None:
        """The bytes of a repository file, or None if there is no such file."""


Publish = Callable[[str, bytes], object]
"""``publish(topic, payload)``: send one frame (QoS 1, not retained)."""


class TransferServer:
    """Turns a :class:`FileRequest` into frames published to the device's block topic."""

    def __init__(
        self,
        source: FileSource,
        publish: Publish,
        *,
        max_blocks_per_request: int = 64,
        cache_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self._source = source
        self._publish = publish
        self.max_blocks_per_request = max_blocks_per_request
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()
        self.blocks_sent = 0
        self.bytes_sent = 0

    def _read(self, path: str) -> bytes | None:
        if not path.startswith("targets/"):
            return self._source.read_file(path)
        with self._lock:
            data = self._cache.get(path)
            if data is not None:
                self._cache.move_to_end(path)
                return data
        data = self._source.read_file(path)
        if data is not None and len(data) <= self._cache_bytes:
            with self._lock:
                self._cache[path] = data
                self._cached += len(data)
                while self._cached > self._cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data

    def handle(self, request: FileRequest) -> int:
        """Serve one request; returns the number of data frames sent."""
        topic = str(DeviceTopic(request.device_id, Channel.FILE_BLOCKS))
        data = self._read(request.path)
        if data is None:
            log.info("%s asked for missing file %s", request.device_id, request.path)
            self._publish(topic, BlockFrame.error(request.request_id, 404, "no such file").encode())
            return 0
        total = len(data)
        bs = request.block_size
        count = block_count(total, bs)
        indices = request.block_indices(self.max_blocks_per_request) if request.ranges else [0]
        sent = 0
        for index in indices:
            if index >= count and not (total == 0 and index == 0):
                continue
            start = index * bs
            payload = data[start : start + block_length(index, total, bs)]
            frame = BlockFrame.data(request.request_id, index, bs, total, payload)
            self._publish(topic, frame.encode())
            sent += 1
            self.bytes_sent += len(payload)
        self.blocks_sent += sent
        return sent
