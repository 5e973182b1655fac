"""Durable files: writes that survive a crash, keys only their owner reads, a file lock.

Both sides keep state in plain files that must never be seen half written:
the agent's identity, ``root.json``, ``current.json`` and the release
high-water mark; the controller's CA, TUF metadata and signing keys. A crash
or power cut must leave the old file or the new one, never a mix, and once a
function here returns the new file must still be there after a reboot.

:func:`atomic_write` therefore does all four steps, in this order: write a
temporary file in the same directory (a rename across file systems is not
atomic), ``fsync`` it, ``os.replace`` it over the target, and ``fsync`` the
directory - without the last step the rename itself may be lost, and the
old file comes back after a power cut. The temporary file is created with the
final mode from the start (and ``fchmod``-ed past the umask), so a private key
is never briefly readable by others.

:func:`read_private` refuses a key file that group or others may access,
checked on the open descriptor (no race between check and read) and without
following a symlink. :func:`file_lock` is an exclusive ``flock``: writers in
different processes (the CLI and the service) take turns.

Errors are the operating system's: :class:`OSError` for I/O, and
:class:`InsecureFileError` (a :class:`PermissionError`) for a key file with
too open a mode. Callers translate them into their own error at the boundary
where they know what the file is for (``TrustError``, ``ConfigError``), so
the messages users see name the file's purpose.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PRIVATE_MODE",
    "PUBLIC_MODE",
    "InsecureFileError",
    "atomic_write",
    "ensure_dir",
    "ensure_private_dir",
    "ensure_private_file",
    "file_lock",
    "fsync_dir",
    "is_disk_full",
    "read_private",
    "write_private",
]

PRIVATE_MODE = 0o600
"""Mode of key and secret files: read and write by the owner only."""

PUBLIC_MODE = 0o644
"""Mode of files anyone on the machine may read (certificates, metadata)."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class InsecureFileError(PermissionError):
    """A private file is accessible to group or others, so it is refused.

    A :class:`PermissionError` rather than an edgefleet error: like every
    other failure of this module it is the file system's answer, and the
    caller maps it to its own error (``KeyPermissionError``, ``ConfigError``).

    Attributes:
        path: the refused file.
        mode: its permission bits (``stat.S_IMODE``).
    """

    def __init__(self, path: Path, mode: int) -> None:
        super().__init__(f"{path} has mode {mode:04o}: group/others can access it")
        self.path = path
        self.mode = mode


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries, so a rename or unlink in it survives a power cut.

    Raises:
        OSError: the directory cannot be opened or synced.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(directory: Path) -> None:
    """Create ``directory`` and missing parents, syncing each new entry to disk.

    ``mkdir(parents=True)`` alone could lose a fresh directory (and every
    file later renamed into it) in a power cut, since its entry lives in the
    parent directory.

    Raises:
        OSError: a directory cannot be created or synced.
    """
    if directory.is_dir():
        return
    ensure_dir(directory.parent)
    with contextlib.suppress(FileExistsError):
        directory.mkdir()
        fsync_dir(directory.parent)


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) and make it owner-only (0700), whatever the umask.

    An existing directory is tightened too: state written before this
    (or by an older version, under a 0022 umask) becomes unreadable to
    others as soon as the owner starts. Files inside keep their modes; the
    directory's mode alone keeps other users out. A sticky directory
    (``/tmp``) is shared by design and left as it is.

    Raises:
        OSError: it cannot be created, or its mode changed (not our directory).
    """
    ensure_dir(directory)
    mode = directory.stat().st_mode
    # A sticky directory (/tmp, /var/tmp) is shared by design: pointing a home
    # or state dir at one must not lock every other user out of it.
    if stat.S_IMODE(mode) != 0o700 and not mode & stat.S_ISVTX:
        os.chmod(directory, 0o700)


def ensure_private_file(path: Path) -> None:
    """Create ``path`` empty if missing, owner-only (0600) whatever the umask; tighten it if not.

    For files another library creates and writes (SQLite's database): it
    keeps the mode it finds, so creating the file first decides the mode.
    A symlink is not followed.

    Raises:
        OSError: it cannot be created or its mode changed.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, PRIVATE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_MODE:
            os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never half.

    On return the new content and its name are on disk. The parent directory
    must exist (see :func:`ensure_dir`). On failure the temporary file is
    removed and ``path`` is unchanged.

    Args:
        path: the file to create or replace.
        data: its new content.
        mode: permission bits of the new file, applied regardless of the umask.

    Raises:
        OSError: the file cannot be written, synced or renamed.
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Atomically write a key or secret readable and writable by its owner only (0600).

    Raises:
        OSError: the file cannot be written.
    """
    atomic_write(path, data, mode=PRIVATE_MODE)


def read_private(path: Path) -> bytes:
    """Read a key or secret, refusing it if group or others have any access to it.

    The mode is checked on the opened descriptor, so the file read is the
    file checked; a symlink is not followed (opening one fails with ELOOP).

    Raises:
        InsecureFileError: group or others may read, write or execute it.
        OSError: it cannot be opened or read, or is a symlink.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & 0o077:
            raise InsecureFileError(path, mode)
        return fh.read()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600 if missing) for the block.

    Blocks until every other holder, in any process, has left its block.
    The lock belongs to the open file, so it is released when the block ends
    or the process dies; it is not re-entrant (a nested ``file_lock`` on the
    same path in one process waits forever).

    Raises:
        OSError: the lock file cannot be opened or locked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk (ENOSPC, EDQUOT)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
