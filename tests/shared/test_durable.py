"""Durable files on a real file system: atomic replace, directory fsync, modes, locks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgefleet.shared import durable
from edgefleet.shared.durable import (
    InsecureFileError,
    atomic_write,
    ensure_dir,
    file_lock,
    read_private,
    write_private,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every fsync the code under test makes, as (kind, inode): the real fsync still runs."""
    calls: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    return calls


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert _mode(target) == 0o644


def test_atomic_write_fsyncs_the_file_then_its_directory(
    tmp_path: Path, synced: list[tuple[str, int]]
) -> None:
    target = tmp_path / "root.json"
    atomic_write(target, b"{}")
    kinds = [kind for kind, _ino in synced]
    assert kinds == ["file", "dir"]
    assert synced[0][1] == target.stat().st_ino  # the temp file, renamed into place
    assert synced[1][1] == tmp_path.stat().st_ino


def test_atomic_write_applies_mode_despite_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "ca.pem", b"cert", mode=0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ca.pem") == 0o644


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_atomic_write_into_a_missing_directory_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")


def test_ensure_dir_creates_parents_and_syncs_each_new_entry(
    tmp_path: Path, synced: list[tuple[str, int]]
) -> None:
    ensure_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert synced == [("dir", tmp_path.stat().st_ino), ("dir", (tmp_path / "a").stat().st_ino)]
    synced.clear()
    ensure_dir(tmp_path / "a" / "b")
    assert synced == []


def test_private_files_are_created_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "device.key", b"secret")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "device.key") == 0o600
    assert read_private(tmp_path / "device.key") == b"secret"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o601, 0o660])
def test_read_private_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "targets.key"
    write_private(key, b"secret")
    key.chmod(mode)
    with pytest.raises(InsecureFileError) as info:
        read_private(key)
    assert info.value.mode == mode
    assert info.value.path == key
    assert isinstance(info.value, PermissionError)


def test_read_private_does_not_follow_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    write_private(real, b"secret")
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(OSError, match="Too many levels of symbolic links") as info:
        read_private(link)
    assert not isinstance(info.value, InsecureFileError)


def test_file_lock_excludes_another_process(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    marker = tmp_path / "child-got-it"
    child_code = textwrap.dedent(
        f"""
        from pathlib import Path
        from edgefleet.shared.durable import file_lock
        with file_lock(Path({str(lock)!r})):
            Path({str(marker)!r}).write_text("x")
        """
    )
    with file_lock(lock):
        assert _mode(lock) == 0o600
        child = subprocess.Popen([sys.executable, "-c", child_code])
        try:
            time.sleep(1.0)  # ample time for the child to start and block on the lock
            assert child.poll() is None
            assert not marker.exists()
        except BaseException:
            child.kill()
            child.wait()
            raise
    assert child.wait(timeout=30) == 0
    assert marker.exists()


def test_file_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with pytest.raises(RuntimeError), file_lock(lock):
        raise RuntimeError("boom")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
            str(lock),
        ],
        check=False,
        timeout=30,
    )
    assert probe.returncode == 0


def test_private_dir_and_file_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    from edgefleet.shared.durable import ensure_private_dir, ensure_private_file

    old = os.umask(0)
    try:
        new = tmp_path / "a" / "home"
        ensure_private_dir(new)
        assert _mode(new) == 0o700
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        ensure_private_dir(loose)  # an existing, too open directory is tightened
        assert _mode(loose) == 0o700
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o1777)
        ensure_private_dir(shared)  # sticky (/tmp-like): shared by design, left alone
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        db = tmp_path / "registry.db"
        ensure_private_file(db)
        assert _mode(db) == 0o600 and db.read_bytes() == b""
        db.write_bytes(b"data")
        db.chmod(0o644)
        ensure_private_file(db)  # tightened, content kept
        assert _mode(db) == 0o600 and db.read_bytes() == b"data"
    finally:
        os.umask(old)
