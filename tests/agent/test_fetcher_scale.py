"""The fetcher's cost per block, and its crash-resume, on real transfers.

- Per-block work must not grow with the blocks already received (issue 11:
  progress was recomputed over every block on every block). Counted in
  operations, not time: calls of ``block_length`` made by the fetcher, and
  visits of the partial file's block set.
- Blocks are synced and logged once per window, not per block: a process
  killed (SIGKILL) mid-window loses only that window's unlogged blocks, and
  the next run fetches exactly what the log does not name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import edgefleet.agent.fetcher as fetcher_module
from edgefleet.agent.fetcher import URL_PREFIX, MqttFetcher, PartialFile, PartialStore
from edgefleet.agent.fetcher import TransferSettings as Settings
from edgefleet.controller.transfer import TransferServer
from edgefleet.protocols.framing import block_length, coalesce
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import BrokerSettings, MqttLink
from edgefleet.shared.memlink import MemoryBroker

BS = 1024


class CountingSet(set[int]):
    """A set that counts how many elements lookups and iteration touch."""

    touched = 0

    def __contains__(self, item: object) -> bool:
        CountingSet.touched += 1
        return super().__contains__(item)

    def __iter__(self) -> Iterator[int]:
        for i in super().__iter__():
            CountingSet.touched += 1
            yield i


class CountingStore(PartialStore):
    """Hands out partial files whose block set counts its visits."""

    def open(self, path: str, block_size: int) -> PartialFile:
        part = super().open(path, block_size)
        part.have = CountingSet(part.have)
        return part


class Files:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def read_file(self, rel_path: str) -> bytes | None:
        return self.files.get(rel_path)


def _serve(link: Any, files: Files) -> list[FileRequest]:
    """A real transfer server answering on ``link``; returns the requests it saw."""
    server = TransferServer(files, lambda t, p, done: link.publish(t, p, qos=1, on_sent=done))
    requests: list[FileRequest] = []

    def on_request(_t: str, payload: bytes, _r: bool) -> None:
        request = FileRequest.decode(payload)
        requests.append(request)
        server.handle(request)

    link.subscribe(DeviceTopic.wildcard(Channel.FILE_REQUEST), on_request)
    return requests


def _fetch_counting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks: int
) -> tuple[int, int, list[int]]:
    """Fetch a ``blocks``-block file; returns (block_length calls, set visits, progress)."""
    data = os.urandom(blocks * BS - 100)
    path = "targets/scale.bin"
    broker = MemoryBroker()
    ctl = broker.link("ctl")
    _serve(ctl, Files({path: data}))
    ctl.start()
    link = broker.link("agent")
    progress: list[int] = []
    fetcher = MqttFetcher(
        link,
        "gw-1",
        CountingStore(tmp_path / f"partial-{blocks}"),
        Settings(block_size_bytes=BS, window_blocks=16, request_timeout_s=5.0),
        on_progress=lambda _p, done, _t: progress.append(done),
    )
    link.subscribe(fetcher.frame_topic, fetcher.on_frame)
    link.start()
    calls = [0]

    def counting_block_length(index: int, total_size: int, block_size: int) -> int:
        calls[0] += 1
        return block_length(index, total_size, block_size)

    monkeypatch.setattr(fetcher_module, "block_length", counting_block_length)
    CountingSet.touched = 0
    try:
        fetcher.expect_length(path, len(data))
        assert b"".join(fetcher.fetch(URL_PREFIX + path)) == data
    finally:
        broker.close()
    assert fetcher.blocks_received == blocks
    # Progress is exact: the bytes of the blocks received so far, ending at the total.
    assert progress == [min((k + 1) * BS, len(data)) for k in range(blocks)]
    return calls[0], CountingSet.touched, progress


def test_per_block_work_does_not_grow_with_blocks_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_calls, small_visits, _ = _fetch_counting(tmp_path, monkeypatch, 64)
    big_calls, big_visits, _ = _fetch_counting(tmp_path, monkeypatch, 1024)
    # Linear: 16x the blocks costs about 16x the operations (the quadratic
    # progress sum made it ~256x: 524,800 block_length calls for 1024 blocks).
    assert big_calls <= 3 * 1024, big_calls
    assert big_visits <= 4 * 1024, big_visits
    assert big_calls / 1024 <= small_calls / 64 + 1
    assert big_visits / 1024 <= small_visits / 64 + 1


def test_partial_file_totals_are_running_and_survive_reopen(tmp_path: Path) -> None:
    total = 40 * BS - 7
    part = PartialFile(tmp_path / "p", BS)
    part.set_total(total)
    part.have = CountingSet(part.have)
    order = [5, 0, 1, 2, 39, 3, 4, 7]
    per_block: list[int] = []
    for i in order:
        before = CountingSet.touched
        part.put_block(i, b"x" * block_length(i, total, BS))
        _ = part.done_bytes, part.complete
        per_block.append(CountingSet.touched - before)
    assert max(per_block) <= 8, per_block  # a membership test, plus the cursor's steps
    assert part.done_bytes == sum(block_length(i, total, BS) for i in order)
    assert part.missing(3) == [6, 8, 9]
    assert not part.complete
    # Put, not yet flushed: not in the log, so a crash now would re-fetch them.
    assert PartialFile(tmp_path / "p", BS).have == set()
    part.close()
    again = PartialFile(tmp_path / "p", BS)
    assert again.have == set(order)
    assert again.done_bytes == part.done_bytes
    assert again.missing(2) == [6, 8]
    for i in again.missing():
        again.write_block(i, b"y" * block_length(i, total, BS))
    assert again.complete and again.done_bytes == total


def test_resume_reports_progress_from_the_blocks_kept(tmp_path: Path) -> None:
    data = os.urandom(30 * BS)
    path = "targets/resume.bin"
    store_dir = tmp_path / "partial"
    earlier = PartialStore(store_dir).open(path, BS)
    earlier.set_total(len(data))
    for i in range(10):
        earlier.write_block(i, data[i * BS : (i + 1) * BS])
    earlier.close()
    broker = MemoryBroker()
    ctl = broker.link("ctl")
    requests = _serve(ctl, Files({path: data}))
    ctl.start()
    link = broker.link("agent")
    progress: list[int] = []
    fetcher = MqttFetcher(
        link,
        "gw-1",
        PartialStore(store_dir),
        Settings(block_size_bytes=BS, window_blocks=8, request_timeout_s=5.0),
        on_progress=lambda _p, done, _t: progress.append(done),
    )
    link.subscribe(fetcher.frame_topic, fetcher.on_frame)
    link.start()
    try:
        fetcher.expect_length(path, len(data))
        assert b"".join(fetcher.fetch(URL_PREFIX + path)) == data
    finally:
        broker.close()
    assert {i for r in requests for i in r.block_indices(1000)} == set(range(10, 30))
    assert progress == [(k + 1) * BS for k in range(10, 30)]


# --------------------------------------------------------------------------- kill -9
_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from edgefleet.agent.fetcher import URL_PREFIX, MqttFetcher, PartialStore, TransferSettings
    from edgefleet.shared.link import BrokerSettings, MqttLink

    port, store, path, size, bs, window = sys.argv[1:7]
    link = MqttLink(BrokerSettings(host="127.0.0.1", port=int(port)), "kill-agent")
    def progress(_p, done, _t):
        print(done, flush=True)
    fetcher = MqttFetcher(
        link, "gw-kill", PartialStore(Path(store)),
        TransferSettings(block_size_bytes=int(bs), window_blocks=int(window),
                         request_timeout_s=120.0, sync_every_bytes=2 * int(window) * int(bs)),
        on_progress=progress,
    )
    fetcher.expect_length(path, int(size))
    link.subscribe(fetcher.frame_topic, fetcher.on_frame)
    link.start()
    list(fetcher._fetch(URL_PREFIX + path))
    print("done", flush=True)
    """
)


def _indices(requests: Iterable[FileRequest]) -> set[int]:
    return {i for r in requests for i in r.block_indices(10_000)}


def test_killed_mid_window_loses_only_the_unlogged_tail_and_resumes(
    tmp_path: Path, mosquitto: BrokerSettings
) -> None:
    window, windows_whole = 8, 4  # synced every 2 windows: after the 2nd and the 4th
    data = os.urandom(64 * BS)
    path = "targets/killed.bin"
    files = Files({path: data})
    store_dir = tmp_path / "partial"
    ctl = MqttLink(mosquitto, "kill-ctl")
    server = TransferServer(files, lambda t, p, done: ctl.publish(t, p, qos=1, on_sent=done))
    requests: list[FileRequest] = []
    served: set[int] = set()
    resume = threading.Event()

    def on_request(_t: str, payload: bytes, _r: bool) -> None:
        request = FileRequest.decode(payload)
        requests.append(request)
        wanted = request.block_indices(10_000)
        if len(requests) > windows_whole and not resume.is_set():
            # The window the agent dies in: only its first half arrives.
            wanted = wanted[: window // 2]
            request = FileRequest(
                device_id=request.device_id,
                request_id=request.request_id,
                path=request.path,
                block_size=request.block_size,
                ranges=tuple(coalesce(wanted)),
            )
        served.update(wanted)
        server.handle(request)

    ctl.subscribe(DeviceTopic.wildcard(Channel.FILE_REQUEST), on_request)
    ctl.start()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(mosquitto.port), str(store_dir), path]
            + [str(v) for v in (len(data), BS, window)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            target = (windows_whole * window + window // 2) * BS
            for line in child.stdout:  # progress lines: bytes received so far
                if line.strip() == "done" or int(line) >= target:
                    break
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(10)
        assert len(requests) == windows_whole + 1

        kept = PartialFile(store_dir / os.listdir(store_dir)[0], BS)
        whole = set(range(windows_whole * window))
        # The windows synced before the kill are logged; of the half window,
        # never synced, at most what made it to the log (none, here).
        # Whatever the log names must be on disk, intact.
        assert whole <= kept.have <= served, sorted(kept.have - whole)
        with open(kept.data_path, "rb") as f:
            for i in kept.have:
                f.seek(i * BS)
                assert f.read(BS) == data[i * BS : (i + 1) * BS]

        resume.set()
        before = len(requests)
        agent = MqttLink(mosquitto, "resume-agent")
        fetcher = MqttFetcher(
            agent,
            "gw-kill",
            PartialStore(store_dir),
            Settings(block_size_bytes=BS, window_blocks=window, request_timeout_s=10.0),
        )
        agent.subscribe(fetcher.frame_topic, fetcher.on_frame)
        agent.start()
        try:
            fetcher.expect_length(path, len(data))
            assert b"".join(fetcher._fetch(URL_PREFIX + path)) == data
        finally:
            agent.stop()
        assert _indices(requests[before:]) == set(range(64)) - kept.have
    finally:
        ctl.stop()


def test_one_sync_per_sync_every_bytes_not_per_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks, window = 256, 16
    data = os.urandom(blocks * BS)
    path = "targets/synced.bin"
    broker = MemoryBroker()
    ctl = broker.link("ctl")
    _serve(ctl, Files({path: data}))
    ctl.start()
    link = broker.link("agent")
    store_dir = tmp_path / "partial"
    fetcher = MqttFetcher(
        link,
        "gw-1",
        PartialStore(store_dir),
        Settings(
            block_size_bytes=BS,
            window_blocks=window,
            request_timeout_s=5.0,
            sync_every_bytes=3 * window * BS,  # every third window
        ),
    )
    link.subscribe(fetcher.frame_topic, fetcher.on_frame)
    link.start()
    syncs = [0]
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        syncs[0] += 1
        real_fdatasync(fd)

    monkeypatch.setattr(fetcher_module.os, "fdatasync", counting_fdatasync)
    try:
        fetcher.expect_length(path, len(data))
        chunks = fetcher.fetch(URL_PREFIX + path)
        # Done: everything is synced and logged before the bytes are handed on.
        assert PartialStore(store_dir).blocks_present(path, BS) == blocks
        assert b"".join(chunks) == data
    finally:
        broker.close()
    # 16 windows: synced after windows 3, 6, 9, 12, 15, then the last at the end.
    assert syncs[0] == 6
