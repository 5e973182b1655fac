"""The MQTT fetcher against the real transfer server, over the in-memory broker.

The end-to-end tests run the same path over amqtt and Mosquitto.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError

from edgefleet.agent.fetcher import (
    URL_PREFIX,
    MqttFetcher,
    PartialFile,
    PartialStore,
    TransferSettings,
)
from edgefleet.controller.transfer import RefusalReason, TransferServer
from edgefleet.protocols.errors import OversizedTransferError, TransferTimeoutError
from edgefleet.protocols.messages import FileRequest
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import Link
from edgefleet.shared.memlink import MemoryBroker

BS = 4096


class Files:
    """A FileSource over a dict; ``gate`` pauses serving to simulate a stalled link."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.reads = 0

    def read_file(self, rel_path: str) -> bytes | None:
        self.reads += 1
        return self.files.get(rel_path)


class Controller:
    def __init__(self, broker: MemoryBroker, files: Files) -> None:
        self.link = broker.link("test-ctl")
        self.server = TransferServer(
            files, lambda t, p, done: self.link.publish(t, p, qos=1, on_sent=done)
        )
        self.requests: list[FileRequest] = []
        self.refuse_next = 0
        self.serving = threading.Event()
        self.serving.set()
        self.link.subscribe(DeviceTopic.wildcard(Channel.FILE_REQUEST), self._on_request)
        self.link.start()

    def _on_request(self, _t: str, payload: bytes, _r: bool) -> None:
        request = FileRequest.decode(payload)
        self.requests.append(request)
        if self.refuse_next:
            self.refuse_next -= 1
            self.server.refuse(
                request.device_id, request.request_id, RefusalReason.RATE, "slow down", 0.3
            )
        elif self.serving.is_set():
            self.server.handle(request)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Controller, Files, MqttFetcher, Link]]:
    broker = MemoryBroker()
    files = Files({})
    ctl = Controller(broker, files)
    link = broker.link("test-agent")
    fetcher = MqttFetcher(
        link,
        "gw-1",
        PartialStore(tmp_path / "partial"),
        TransferSettings(
            block_size_bytes=BS, window_blocks=4, request_timeout_s=1.0, max_attempts=2
        ),
    )
    link.subscribe(fetcher.frame_topic, fetcher.on_frame)
    link.start()
    yield ctl, files, fetcher, link
    broker.close()


def test_fetches_a_multi_block_file(setup: tuple[Controller, Files, MqttFetcher, Link]) -> None:
    _, files, fetcher, _ = setup
    data = os.urandom(10 * BS + 123)
    files.files["targets/abc.bin"] = data
    fetcher.expect_length("targets/abc.bin", len(data))
    assert b"".join(fetcher.fetch(URL_PREFIX + "targets/abc.bin")) == data
    assert fetcher.blocks_received == 11


def test_missing_file_is_a_404_for_tuf(
    setup: tuple[Controller, Files, MqttFetcher, Link],
) -> None:
    _, _, fetcher, _ = setup
    with pytest.raises(DownloadHTTPError) as info:
        list(fetcher.fetch(URL_PREFIX + "metadata/2.root.json"))
    assert info.value.status_code == 404


def test_resume_requests_only_missing_blocks(
    setup: tuple[Controller, Files, MqttFetcher, Link], tmp_path: Path
) -> None:
    ctl, files, fetcher, _ = setup
    data = os.urandom(12 * BS)
    path = "targets/resume.bin"
    files.files[path] = data
    # An earlier run got blocks 0-4 and 9 before the link dropped.
    part = PartialStore(tmp_path / "partial").open(path, BS)
    part.set_total(len(data))
    for i in [0, 1, 2, 3, 4, 9]:
        part.write_block(i, data[i * BS : (i + 1) * BS])
    fetcher.expect_length(path, len(data))
    assert b"".join(fetcher.fetch(URL_PREFIX + path)) == data
    asked = {i for r in ctl.requests for i in r.block_indices(1000)}
    assert asked == {5, 6, 7, 8, 10, 11}
    assert fetcher.blocks_received == 6


def test_frames_claiming_more_than_promised_are_refused(
    setup: tuple[Controller, Files, MqttFetcher, Link],
) -> None:
    _, files, fetcher, _ = setup
    files.files["targets/big.bin"] = os.urandom(8 * BS)
    fetcher.expect_length("targets/big.bin", 2 * BS)
    with pytest.raises(DownloadError) as info:
        list(fetcher.fetch(URL_PREFIX + "targets/big.bin"))
    assert isinstance(info.value.__cause__, OversizedTransferError)


def test_stalled_transfer_times_out_after_retries(
    setup: tuple[Controller, Files, MqttFetcher, Link],
) -> None:
    ctl, files, fetcher, _ = setup
    files.files["targets/slow.bin"] = os.urandom(BS)
    ctl.serving.clear()
    with pytest.raises(DownloadError) as info:
        list(fetcher.fetch(URL_PREFIX + "targets/slow.bin"))
    assert isinstance(info.value.__cause__, TransferTimeoutError)
    assert len(ctl.requests) == 2  # max_attempts


def test_a_refusal_is_waited_out_then_asked_again_not_timed_out(
    setup: tuple[Controller, Files, MqttFetcher, Link],
) -> None:
    ctl, files, fetcher, _ = setup
    fetcher.settings = replace(fetcher.settings, request_timeout_s=5.0, max_attempts=1)
    data = os.urandom(6 * BS)
    files.files["targets/busy.bin"] = data
    fetcher.expect_length("targets/busy.bin", len(data))
    ctl.refuse_next = 2
    started = time.monotonic()
    assert b"".join(fetcher.fetch(URL_PREFIX + "targets/busy.bin")) == data
    elapsed = time.monotonic() - started
    assert fetcher.refusals == 2
    # It waited the retry-after twice (0.3 s each), not a request timeout (5 s),
    # and a refusal did not count as one of its (here: one) attempts.
    assert 0.6 <= elapsed < 4.0
    assert len(ctl.requests) == 4  # two refused, then the two windows of 4 + 2 blocks


def test_endless_refusals_give_up_after_the_refusal_budget(
    setup: tuple[Controller, Files, MqttFetcher, Link],
) -> None:
    ctl, files, fetcher, _ = setup
    fetcher.settings = replace(fetcher.settings, max_refused_wait_s=1.0)
    files.files["targets/never.bin"] = os.urandom(BS)
    ctl.refuse_next = 1000
    with pytest.raises(DownloadError) as info:
        list(fetcher.fetch(URL_PREFIX + "targets/never.bin"))
    assert isinstance(info.value.__cause__, TransferTimeoutError)
    assert fetcher.refusals >= 3


def test_partial_file_survives_reopen_and_ignores_torn_log(tmp_path: Path) -> None:
    part = PartialFile(tmp_path / "p", 1024)
    part.set_total(5000)
    part.write_block(0, b"a" * 1024)
    part.write_block(3, b"b" * 1024)
    with open(tmp_path / "p" / "blocks", "ab") as f:
        f.write(b"\x00\x00")  # a crash mid-append
    again = PartialFile(tmp_path / "p", 1024)
    assert again.have == {0, 3}
    assert again.missing() == [1, 2, 4]
    # A different block size invalidates what was kept.
    assert PartialFile(tmp_path / "p", 2048).have == set()
