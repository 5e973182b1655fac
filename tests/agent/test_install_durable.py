"""What the rollback guard and the trust bootstrap rely on reaches the disk, directory included.

``releases.json`` is the anti-rollback high-water mark and ``tuf/metadata/root.json``
the agent's trust anchor: a power cut right after either is written must not
bring back the old file, so each write must fsync the file *and* its directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgefleet.agent.install import Installer
from edgefleet.agent.serving import ModelHolder
from edgefleet.agent.slots import SlotStore
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared import durable
from tests.agent.test_slots import SHA_A, install


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Inodes fsynced by the code under test, in order (the real fsync still runs)."""
    inodes: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        inodes.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    return inodes


def _file_then_dir(synced: list[int], path: Path) -> bool:
    """Was ``path`` (as it is now) fsynced, and its directory after it?"""
    file_ino, dir_ino = path.stat().st_ino, path.parent.stat().st_ino
    return file_ino in synced and dir_ino in synced[synced.index(file_ino) + 1 :]


def _installer(state: Path) -> tuple[Installer, SlotStore]:
    slots = SlotStore(state)
    hardware = HardwareInfo("x86_64", ("avx2",), ("onnxruntime",))
    # No download happens in these tests, so no fetcher (and no broker) is needed.
    installer = Installer(state, None, slots, ModelHolder(), hardware)  # type: ignore[arg-type]
    return installer, slots


def test_release_high_water_mark_is_durable(tmp_path: Path, synced: list[int]) -> None:
    installer, slots = _installer(tmp_path / "state")
    record = install(slots, 7, SHA_A)
    installer._activate(record, object())  # type: ignore[arg-type]
    releases = tmp_path / "state" / "releases.json"
    assert json.loads(releases.read_text()) == {"det": 7}
    assert _file_then_dir(synced, releases)


def test_bootstrapped_trust_root_is_durable(tmp_path: Path, synced: list[int]) -> None:
    installer, _slots = _installer(tmp_path / "state")
    root = tmp_path / "root.json"
    root.write_bytes(b'{"signed": {}}')
    installer.bootstrap_trust(root)
    installed = installer.metadata_dir / "root.json"
    assert installed.read_bytes() == root.read_bytes()
    assert _file_then_dir(synced, installed)
